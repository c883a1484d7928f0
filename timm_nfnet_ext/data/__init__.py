"""Input pipelines: DeepMind's evaluation and training preprocessing, exact from the encoded file."""
from .crop import center_crop_window, distorted_crop_window, sample_distorted_crop
from .datasets import FileImageDataset
from .decode import ImageDecodeError, decode_image, image_format
from .mixing import MixParams, apply_mix, mix_batch, sample_mix_params
from .randaugment import RandAugment
from .resize import bicubic_taps, resize_crop
from .train_transforms import (ReferenceTrainBatch, ReferenceTrainDataset, ReferenceTrainTransform,
                               create_train_pipeline, sample_seed)
from .transforms import ReferenceEvalTransform, create_eval_transform, to_rgb_array

__all__ = ['FileImageDataset', 'ImageDecodeError', 'ReferenceEvalTransform', 'bicubic_taps', 'create_eval_transform',
           'decode_image', 'image_format', 'resize_crop', 'to_rgb_array',
           'MixParams', 'RandAugment', 'ReferenceTrainBatch', 'ReferenceTrainDataset', 'ReferenceTrainTransform',
           'apply_mix', 'center_crop_window', 'create_train_pipeline', 'distorted_crop_window', 'mix_batch',
           'sample_distorted_crop', 'sample_mix_params', 'sample_seed']
