"""The one feature extractor: images -> L2-normalised embeddings, on CUDA when there is a GPU.

Every caller that turns images into vectors goes through `FeatureExtractor`: the embedding stage
(embed.split), the query engine (retrieve.engine), finetune's validation and the embedding benchmark.

    fx = FeatureExtractor(backbone)            # device "auto": geovote.distributed.pick_device
    emb = fx.images([pil, pil, ...])           # (N, dim) float32, L2-normalised
    for rows, emb, reasons in fx.dataset(ds, batches, workers=2): ...

On CUDA the forward runs under bf16 autocast with channels-last inputs, batches are copied from pinned
memory without blocking; on CPU it runs in float32. The output is always float32, normalised in float32.
"""
from __future__ import annotations

import numpy as np

from geovote.distributed import pick_device

PRECISIONS = ("auto", "fp32", "bf16")


class FeatureExtractor:
    """A backbone's tower on a device, at a precision. `model` may be any module mapping normalised
    image batches (B, 3, S, S) to (B, dim); `backbone` supplies the preprocessing for `images`."""

    def __init__(self, backbone, device: str = "auto", precision: str = "auto", batch_size: int = 256,
                 model=None):
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.backbone = backbone
        self.device = pick_device(device)
        self.cuda = self.device.startswith("cuda")
        # "auto": bf16 on CUDA, unless the backbone asks for fp32 (the OSV-5M paper's network, whose
        # head's cell choice must be the float32 forward's)
        self.bf16 = precision == "bf16" or (precision == "auto" and self.cuda
                                            and getattr(backbone, "precision", "auto") != "fp32")
        if self.bf16 and not self.cuda:
            raise ValueError("bf16 is for CUDA here; on CPU use fp32")
        self.batch_size = batch_size
        self.model = (model if model is not None else backbone.model).to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._transform = None

    def __call__(self, x) -> np.ndarray:
        """(B, 3, S, S) preprocessed tensor -> (B, dim) float32 L2-normalised numpy array."""
        import torch
        from torch.nn import functional as F

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                x = x.to(self.device, non_blocking=True)
                if self.cuda:
                    x = x.to(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.model(x)
                return F.normalize(out.float(), dim=1).cpu().numpy()
        finally:
            self.model.train(was_training)

    def transform(self):
        if self._transform is None:
            self._transform = self.backbone.transform()
        return self._transform

    def images(self, images: list) -> np.ndarray:
        """PIL images -> (N, dim) float32 embeddings, in batches of `batch_size`."""
        import torch

        tf = self.transform()
        out = [self(torch.stack([tf(img) for img in images[s:s + self.batch_size]]))
               for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.backbone.dim), np.float32)

    def dataset(self, dataset, batches=None, workers: int = 0):
        """Yield (rows, embeddings, reasons) per batch of a dataset whose items are (row, tensor, reason):
        a non-empty reason marks an image that failed to decode (its tensor is ignored, it gets no
        embedding: `embeddings` has one row per empty reason, in order). `batches`: lists of rows
        (default: consecutive batches of `batch_size`). A dataset of encoded images
        (embed.gpudecode.EncodedImages) is decoded and preprocessed batch by batch on this device."""
        import torch

        if batches is None:
            batches = [list(range(s, min(s + self.batch_size, len(dataset))))
                       for s in range(0, len(dataset), self.batch_size)]
        encoded = getattr(dataset, "encoded", False)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             pin_memory=self.cuda and not encoded,
                                             collate_fn=dataset.collate if encoded else None,
                                             prefetch_factor=4 if workers else None)
        if encoded:
            from embed.gpudecode import DevicePreprocess

            prepare = DevicePreprocess(self.backbone, self.device, dataset.max_pixels)
            for rows, data, reasons in loader:
                x, reasons = prepare(data, reasons)
                emb = self(x) if len(x) else np.zeros((0, self.backbone.dim), np.float32)
                yield rows.numpy(), emb, reasons
            return
        for rows, x, reasons in loader:
            ok = np.array([r == "" for r in reasons], bool)
            if ok.all():
                emb = self(x)  # the pinned batch itself: its copy to the GPU does not block
            elif ok.any():
                emb = self(x[torch.from_numpy(ok)])
            else:
                emb = np.zeros((0, self.backbone.dim), np.float32)
            yield rows.numpy(), emb, list(reasons)


class ImageFiles:
    """A dataset of image files for `FeatureExtractor.dataset`: row -> (row, tensor, reason). A file
    that cannot be decoded is a zero tensor and the reason (embed.images.ImageFailure)."""

    def __init__(self, paths: list, transform, image_size: int, max_pixels: int | None = None,
                 reduced: bool = True):
        from embed.images import DEFAULT_MAX_PIXELS

        self.paths, self.transform, self.image_size = paths, transform, image_size
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        # reduced: JPEGs decoded at 1/2 .. 1/8 scale where the model's input allows (embed.images.open_rgb);
        # else at full size, for a model whose vectors must be the plain decode's exactly
        self.decode_side = image_size if reduced else 1 << 30

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        import torch

        from embed.images import ImageFailure, open_rgb

        try:
            return row, self.transform(open_rgb(self.paths[row], self.decode_side, self.max_pixels)), ""
        except ImageFailure as e:
            return row, torch.zeros(3, self.image_size, self.image_size), str(e)
