"""Publishing NFNet weights to the Hugging Face Hub (installed as ``timm_nfnet_hub``).

- ``manifest``: the releases (``manifest.json``: DeepMind's F0-F6 checkpoints, sizes, resolutions,
  accuracy, licence, target repo names);
- ``sources``: ``--src`` as a local file, a URL (downloaded, size-checked) or ``hf-hub:``;
- ``validate`` / ``timm_reference``: build the model and prove it equal to its source;
- ``card``: the model card; ``build``: source -> checked release folder, all or nothing;
- ``gitmirror``: commit a folder into a Hub-shaped local git repository (LFS pointers);
- ``publish``: the ``timm-nfnet-hub`` command (list, build, publish).
"""
