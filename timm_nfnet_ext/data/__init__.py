"""Input pipelines: DeepMind's evaluation preprocessing, exact from the encoded file."""
from .datasets import FileImageDataset
from .decode import ImageDecodeError, decode_image, image_format
from .resize import bicubic_taps, resize_crop
from .transforms import ReferenceEvalTransform, create_eval_transform, to_rgb_array

__all__ = ['FileImageDataset', 'ImageDecodeError', 'ReferenceEvalTransform', 'bicubic_taps', 'create_eval_transform',
           'decode_image', 'image_format', 'resize_crop', 'to_rgb_array']
