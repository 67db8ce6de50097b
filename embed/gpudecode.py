"""JPEG decoding as a batch on the extractor's device: torchvision's `decode_jpeg` (nvjpeg on CUDA), then
the model's preprocessing in torch on that device. The embedding stage's other decode path
(`EmbedConfig.decode = "torchvision"`); the default, "pil", decodes in the DataLoader workers with PIL's
reduced-size (draft) decoding (embed.images.open_rgb).

Workers only read the encoded bytes (`EncodedImages`: a file, or a member of an archive read in place),
so the cores are left to feed the GPU; the batch is decoded at full size on the device and its shortest
side resized there (bicubic with antialiasing, rounded to 8 bits as PIL's resize is), centre-cropped and
normalised exactly as `embed.models.ShortestSideTransform` does. Images nvjpeg cannot take (PNG, WebP,
CMYK or otherwise unusual JPEGs) and JPEGs over DEVICE_MAX_PIXELS are decoded with PIL in the main
process as the PIL path decodes them, then preprocessed the same way, so that a batch never fails as a
whole; an image is refused where the PIL path refuses it, with its reason.

The embeddings differ from the PIL path's by the resize filter's implementation and by PIL's reduced-
size (draft) decoding, which nvjpeg does not do: `tests/test_gpudecode.py` checks the cosine on the CPU;
`benchmark/gpu_check.py` (step `decode`) measures both paths' rates and the cosine on a GPU.
"""
from __future__ import annotations

import io
import warnings

import numpy as np

JPEG_MAGIC = b"\xff\xd8"
DECODE_PATHS = ("pil", "pil-full", "torchvision")


DEVICE_MAX_PIXELS = 50_000_000  # a JPEG larger than this is decoded by PIL at reduced size, not on the device


class EncodedImages:
    """A dataset for `FeatureExtractor.dataset`: row -> (row, the image's encoded bytes, reason, its full
    size in pixels). Nothing is decoded here but the header: an image is refused exactly where the PIL
    path refuses it (the pixel limit after reduced-size decoding, embed.images.open_rgb); one that cannot
    be read is empty bytes and the reason. A batch travels from its worker as one tensor (`collate`):
    one shared-memory file per batch, not one per image."""

    encoded = True  # FeatureExtractor.dataset: batches of encoded images, decoded on the device

    def __init__(self, paths, image_size: int, max_pixels: int | None = None):
        from embed.images import DEFAULT_MAX_PIXELS

        self.paths, self.image_size = paths, image_size
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        from embed.images import ImageFailure, archive_member, decoded_size, regular_file

        try:
            path = self.paths[row]
            member = archive_member(path)
            if member is None:
                regular_file(path)
                with open(path, "rb") as f:
                    member = io.BytesIO(f.read())
            w, h = decoded_size(member, self.image_size)  # what the PIL path would decode, and refuse
            if w * h > self.max_pixels:
                raise ImageFailure(f"too large: {w}x{h} pixels (limit {self.max_pixels:,})")
            full_w, full_h = decoded_size(member, 1 << 30)
            return row, member.getvalue(), "", full_w * full_h
        except ImageFailure as e:
            return row, b"", str(e), 0
        except OSError as e:
            return row, b"", f"unreadable: {e.strerror or e}", 0

    @staticmethod
    def collate(items):
        """(rows, (all the batch's bytes as one uint8 tensor, each image's length, each image's full
        pixels), reasons)."""
        import torch

        rows, data, reasons, pixels = zip(*items)
        flat = torch.frombuffer(bytearray(b"".join(data)), dtype=torch.uint8) if any(data) else \
            torch.zeros(0, dtype=torch.uint8)
        return torch.tensor(rows), (flat, torch.tensor([len(d) for d in data]), torch.tensor(pixels)), \
            list(reasons)


class DevicePreprocess:
    """Encoded images -> the model's input batch on `device`: (B_ok, 3, S, S) float32 and each image's
    reason ("" for the ones in the batch, in order)."""

    def __init__(self, backbone, device: str, max_pixels: int | None = None):
        if backbone.resize_mode != "shortest" or backbone.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"decode 'torchvision' does the shortest-side resize only; this model's "
                             f"preprocessing is {backbone.resize_mode} / {backbone.interpolation}: use 'pil'")
        import torch

        from embed.images import DEFAULT_MAX_PIXELS

        self.size, self.mode, self.device = backbone.image_size, backbone.interpolation, device
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS  # the workers' limit (EncodedImages)
        self.mean = torch.tensor(backbone.mean, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(backbone.std, dtype=torch.float32, device=device)[:, None, None]

    def __call__(self, batch: tuple, reasons: list[str]):
        import torch

        flat, lengths, pixels = batch
        ends = torch.cumsum(lengths, 0).tolist()
        encoded = [flat[e - n:e] for e, n in zip(ends, lengths.tolist())]
        reasons = list(reasons)
        decoded: dict[int, object] = {}
        jpegs = [i for i, r in enumerate(reasons) if not r and bytes(encoded[i][:2].tolist()) == JPEG_MAGIC
                 and int(pixels[i]) <= DEVICE_MAX_PIXELS]
        decoded.update(self._decode_jpegs(encoded, jpegs))
        for i, r in enumerate(reasons):
            if not r and i not in decoded:  # not a JPEG, a huge one, or one nvjpeg refused: PIL, as the
                # other path decodes it (at reduced size where the model's input allows)
                try:
                    decoded[i] = self._decode_pil(encoded[i])
                except Exception as e:  # noqa: BLE001 (ImageFailure and PIL's own errors)
                    reasons[i] = str(e)
        out = [self._prepare(decoded[i]) for i, r in enumerate(reasons) if not r]
        x = torch.stack(out) if out else torch.zeros(0, 3, self.size, self.size, device=self.device)
        return x, reasons

    def _decode_jpegs(self, encoded: list, which: list[int]) -> dict:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not which:
            return {}
        # torchvision 0.29 announces that its decoders will move to TorchCodec: they work, and the
        # warning, once per batch, would drown the progress bar
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:  # one batched call: nvjpeg's batched decode on CUDA
                images = decode_jpeg([encoded[i] for i in which], mode=ImageReadMode.RGB, device=self.device)
                return dict(zip(which, images))
            except RuntimeError:  # one bad image fails the call: decode them one by one
                out = {}
                for i in which:
                    try:
                        out[i] = decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError:
                        pass  # left to PIL
                return out

    def _decode_pil(self, data):
        import torch

        from embed.images import open_rgb

        img = open_rgb(io.BytesIO(data.numpy().tobytes()), self.size, self.max_pixels)
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
        return torch.from_numpy(arr).to(self.device)

    def _prepare(self, img):
        """(3, H, W) uint8 on the device -> (3, S, S) normalised float32: ShortestSideTransform's steps
        (its sizes and crop, embed.models), then (x / 255 - mean) / std."""
        from torch.nn import functional as F

        from embed.models import centre_crop_origin, shortest_side_size

        s = self.size
        _, h, w = img.shape
        x = img.float()
        if (w, h) != (s, s):
            new_w, new_h = shortest_side_size(w, h, s)
            if (new_w, new_h) != (w, h):
                x = F.interpolate(x[None], size=(new_h, new_w), mode=self.mode, antialias=True,
                                  align_corners=False)[0]
                x = x.round().clamp_(0, 255)  # 8 bits, as PIL's resize gives
            left, top = centre_crop_origin(x.shape[2], x.shape[1], s)
            x = x[:, top:top + s, left:left + s]
        return ((x / 255.0 - self.mean) / self.std).contiguous()
