"""ComfyUI IMAGE tensors <-> PNG bytes.

ComfyUI's IMAGE is a torch float32 tensor [batch, height, width, channels] with
values in 0..1. This module converts one batch to PNGs and PNGs back to one
batch, with the numpy, PIL and torch that ComfyUI ships; nothing else.
"""

import io


def tensor_to_pngs(images):
    """One PNG (bytes) per image of a [B, H, W, C] batch."""
    import numpy as np
    from PIL import Image

    batch = np.asarray(images.detach().cpu().numpy(), dtype=np.float32)
    if batch.ndim == 3:  # a single [H, W, C] image
        batch = batch[None]
    pngs = []
    for image in batch:
        pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        pngs.append(out.getvalue())
    return pngs


def pngs_to_tensor(pngs):
    """A [B, H, W, 3] float32 batch in 0..1 from images of one size (PNG or JPEG bytes)."""
    import numpy as np
    import torch

    arrays = []
    for data in pngs:
        image = decode(data).convert("RGB")
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    if not arrays:
        raise RuntimeError("fluxlora: the daemon returned no images")
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise RuntimeError(f"fluxlora: the daemon's images differ in size {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays))


def decode(data):
    """A loaded PIL image from encoded bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image
