"""``timm-nfnet-hub``: convert, validate and publish DeepMind's NFNet weights to the Hugging Face Hub.

    timm-nfnet-hub list
    timm-nfnet-hub build F0 --src F0_haiku.npz -o out/nfnet_f0 --namespace ORG
    timm-nfnet-hub publish F0 --namespace ORG --dry-run          # build, validate, show the upload
    timm-nfnet-hub publish F0 --namespace ORG                    # create_repo + upload_folder
    timm-nfnet-hub publish F0 --namespace ORG --git-mirror DIR   # commit into DIR/models/ORG/nfnet_f0.dm_in1k

Without ``--src`` the manifest's URL is downloaded (size-checked, cached). ``--namespace``
defaults to ``$TIMM_NFNET_HUB_NAMESPACE``, the setting that points the pretrained cfgs at the
same repos. Publishing to the Hub needs a write token (``HF_TOKEN`` or ``hf auth login``): it is
checked, and the endpoint reached, before anything is converted or uploaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

from .manifest import ManifestError, Release, get_release, load_manifest

from .names import NAMESPACE_ENV

__all__ = ['PublishError', 'connect_hub', 'upload_to_hub', 'main']



class PublishError(RuntimeError):
    """The Hub cannot be reached or refuses the upload."""


# --- the Hub -----------------------------------------------------------------------------------
def connect_hub(endpoint: Optional[str] = None, token: Optional[str] = None,
                namespace: Optional[str] = None) -> Tuple[Any, str]:
    """An ``HfApi`` with a token the endpoint accepts, and the account name; raises ``PublishError``.

    Warns when ``namespace`` is neither the account nor one of its organisations.

    Args:
        endpoint: the Hub endpoint (default: huggingface_hub's, ``$HF_ENDPOINT`` or huggingface.co).
        token: a Hub token (default: ``$HF_TOKEN`` or the stored login).
        namespace: the user or organisation to publish to, checked against the account.

    Returns:
        The ``HfApi`` and the account name.

    Raises:
        PublishError: no token, a token the endpoint rejects or that is read-only, or an
            endpoint that cannot be reached.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    token = token or get_token()
    if not token:
        raise PublishError('no Hugging Face token: set HF_TOKEN or run `hf auth login` '
                           '(a token with write access to the namespace); nothing was uploaded')
    api = HfApi(endpoint=endpoint, token=token)
    try:
        who = api.whoami()
    except HfHubHTTPError as e:
        status = getattr(e.response, 'status_code', None)
        if status == 401:
            raise PublishError(f'{api.endpoint} rejected the token (HTTP 401); nothing was uploaded') from None
        raise PublishError(f'{api.endpoint} answered HTTP {status} to whoami: {e}; nothing was uploaded') from None
    except Exception as e:  # connection refused, DNS, timeout, TLS: transport errors of any HTTP backend
        raise PublishError(f'cannot reach the Hub at {api.endpoint} ({type(e).__name__}: {e}); '
                           'nothing was uploaded') from None
    access = (who.get('auth') or {}).get('accessToken') or {}
    if access.get('role') == 'read':  # fine-grained tokens carry per-repo scopes: left to the upload
        raise PublishError(f'the token for {who.get("name")} is read-only: publishing needs a token with write '
                           'access; nothing was uploaded')
    names = {who.get('name')} | {org.get('name') for org in who.get('orgs', []) if isinstance(org, dict)}
    if namespace and namespace not in names:
        print(f'warning: {who.get("name")} is not {namespace!r} nor a member of it; the upload may be refused',
              file=sys.stderr)
    return api, who.get('name', '?')


def _head(api: Any, repo_id: str) -> Optional[str]:
    try:
        return api.repo_info(repo_id, repo_type='model').sha
    except Exception:
        return None


def upload_to_hub(api: Any, folder: Path, repo_id: str, message: str, files: List[str],
                  private: bool = False) -> Tuple[str, bool]:
    """``create_repo(exist_ok=True)`` then ``upload_folder``; returns (commit id, whether a commit was made).

    ``private`` applies when the repo is created; an existing repo keeps its visibility.
    huggingface_hub drops files whose content the repo already has and makes no commit when
    nothing is left, so publishing unchanged content twice leaves the repo as it was.

    Args:
        api: an ``HfApi`` (from :func:`connect_hub`).
        folder: the release folder.
        repo_id: the Hub repo.
        message: the commit message.
        files: the file names (or patterns) of ``folder`` to upload.
        private: create the repo private.

    Returns:
        The repo's head commit id, and whether this call made a commit.

    Raises:
        PublishError: the repo cannot be created or the upload fails.
    """
    try:
        api.create_repo(repo_id, repo_type='model', exist_ok=True, private=private)
        before = _head(api, repo_id)
        info = api.upload_folder(repo_id=repo_id, repo_type='model', folder_path=str(folder),
                                 allow_patterns=list(files), commit_message=message)
    except Exception as e:
        raise PublishError(f'upload to {repo_id} failed: {type(e).__name__}: {e}') from None
    return info.oid, info.oid != before


# --- commands ------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    """``list``: print the manifest's releases."""
    releases = load_manifest(args.manifest)
    print(f'{"release":8} {"repo name":20} {"model":10} {"px train/test":14} {"top-1":>6} {"top-5":>6} '
          f'{"params":>8}  source (bytes)')
    for r in releases.values():
        size = f'{r.source_size:,}' if r.source_size else 'size unknown'
        top1, top5 = (f'{v:6.1f}' if v is not None else f'{"-":>6}' for v in (r.top1, r.top5))
        print(f'{r.key:8} {r.repo_name:20} {r.model:10} {f"{r.train_size}/{r.test_size}":14} {top1} '
              f'{top5} {r.params_m:7.1f}M  {r.source_url or "-"} ({size})')
    return 0


def _namespace(args: argparse.Namespace) -> str:
    ns = (args.namespace or os.environ.get(NAMESPACE_ENV, '')).strip()
    if not ns:
        raise ManifestError(f'no namespace: pass --namespace ORG or set {NAMESPACE_ENV}')
    return ns


@contextmanager
def _staging(out: Optional[str]) -> Iterator[Path]:
    if out:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix='timm-nfnet-hub-') as tmp:
        yield Path(tmp) / 'release'


def _build(args: argparse.Namespace, release: Release, out: Path, repo_id: str) -> Any:
    """Build and validate into ``out``, printing each check; returns the ``BuildResult``."""
    from .build import build_release
    from .validate import describe_unchecked
    result = build_release(release, out, repo_id, src=args.src, reference=args.reference,
                           cross_check=args.cross_check, cache_dir=args.cache_dir,
                           expected_size=args.expected_size)
    print(f'{release.key}: {result.built.source} -> {result.folder}')
    for check in result.built.checks:
        print(f'  ok  {check}')
    warning = describe_unchecked(result.built)
    if warning:
        print(f'  note: {warning}')
    return result


def cmd_build(args: argparse.Namespace) -> int:
    """``build``: convert and validate a release into ``--output``."""
    release = get_release(args.release, args.manifest)
    result = _build(args, release, Path(args.output), release.repo_id(_namespace(args)))
    print('wrote ' + ', '.join(str(p) for p in result.files))
    return 0


def _show_plan(result: Any, target: str) -> None:
    from .sources import sha256_file
    print(f'dry run: would publish to {target} (create_repo exist_ok=True, then upload_folder):')
    for path in result.files:
        print(f'  {path.name:18} {path.stat().st_size:>14,} bytes  sha256 {sha256_file(path)}')
    print('nothing was uploaded')


def cmd_publish(args: argparse.Namespace) -> int:
    """``publish``: build, then upload to the Hub, commit into a git mirror, or (``--dry-run``) only show."""
    release = get_release(args.release, args.manifest)
    repo_id = release.repo_id(_namespace(args))
    repo_path = None
    if args.git_mirror:
        from .gitmirror import mirror_repo_path
        repo_path = mirror_repo_path(args.git_mirror, repo_id)
    what = 'DeepMind weights' if release.from_deepmind else 'weights'
    message = args.message or f'{release.title}: {what} converted and validated by timm-nfnet-hub'
    api = None
    if not args.dry_run and not args.git_mirror:
        api, user = connect_hub(args.endpoint, args.token, repo_id.split('/')[0])  # fail fast, before any work
        print(f'logged in to {api.endpoint} as {user}')
    from .build import FILES  # torch and timm: imported only once the Hub has said yes
    with _staging(args.output) as out:
        result = _build(args, release, out, repo_id)
        if args.dry_run:
            endpoint = args.endpoint or os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
            _show_plan(result, f'{endpoint}/{repo_id}')
            return 0
        if repo_path is not None:
            from .gitmirror import commit_folder
            commit, changed = commit_folder(result.folder, repo_path, message, FILES)
        else:
            commit, changed = upload_to_hub(api, result.folder, repo_id, message, list(FILES), args.private)
            repo_path = f'{api.endpoint}/{repo_id}'
    print(f'{"committed" if changed else "unchanged, no new commit:"} {repo_path} @ {commit}')
    return 0


# --- argument parsing -----------------------------------------------------------------------------
def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('release', help='release key (F0 ... F6) or repo name (nfnet_f0.dm_in1k)')
    p.add_argument('--src', help='checkpoint: local file, http(s) URL or hf-hub:ORG/NAME '
                                 '(default: download the manifest URL)')
    p.add_argument('--namespace', help=f'Hub user or organisation (default: ${NAMESPACE_ENV})')
    p.add_argument('--reference', help='folder with input.npy + logits.npy: DeepMind outputs to reproduce')
    p.add_argument('--cross-check', help='a second copy of the same weights (any layout) that must match, '
                                         'e.g. hf-hub:timm/dm_nfnet_f0.dm_in1k')
    p.add_argument('--expected-size', type=int, help='byte size the source must have (overrides the manifest)')
    p.add_argument('--cache-dir', help='where downloads are kept (default: ~/.cache/timm_nfnet_hub)')


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--manifest', help='release manifest (default: the packaged manifest.json)')
    parser = argparse.ArgumentParser(
        prog='timm-nfnet-hub',
        description="Convert, validate and publish DeepMind's NFNet weights to the Hugging Face Hub.")
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('list', parents=[common], help='show the releases in the manifest').set_defaults(func=cmd_list)
    build = sub.add_parser('build', parents=[common], help='convert + validate a release into a folder')
    _source_args(build)
    build.add_argument('-o', '--output', required=True, help='output folder')
    build.set_defaults(func=cmd_build)
    pub = sub.add_parser('publish', parents=[common],
                         help='build, then upload to the Hub (or --dry-run, or --git-mirror)')
    _source_args(pub)
    where = pub.add_mutually_exclusive_group()
    where.add_argument('--dry-run', action='store_true', help='build and validate, show what would be uploaded')
    where.add_argument('--git-mirror', metavar='DIR', help='commit into the git repo DIR/models/ORG/NAME instead')
    pub.add_argument('-o', '--output', help='keep the built folder here (default: a temporary folder)')
    pub.add_argument('--endpoint', help='Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)')
    pub.add_argument('--token', help='Hub token (default: $HF_TOKEN or the stored login)')
    pub.add_argument('--message', help='commit message')
    pub.add_argument('--private', action='store_true', help='create the repo private (an existing repo keeps '
                                                            'its visibility)')
    pub.set_defaults(func=cmd_publish)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``timm-nfnet-hub``; returns the exit status (0 ok, 1 error, 2 usage).

    Args:
        argv: the command-line arguments; None reads ``sys.argv``.

    Returns:
        0 on success, 1 on an error (printed to stderr, without a traceback).

    Raises:
        SystemExit: bad usage (from argparse, exit status 2), or ``--help``.
    """
    from .gitmirror import GitMirrorError
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, PublishError, GitMirrorError, OSError) as e:  # every error of ours: message, no trace
        print(f'timm-nfnet-hub: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
