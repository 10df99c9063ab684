"""Model inputs of UTGRec's content encoder, built without the model: a small picklable object that holds the
tokenizer (with the code tokens) and, for Qwen2-VL, the image processor, so DataLoader workers can run it.

:class:`ItemPreparer` gives the encoder inputs (``encoder_inputs``: prompts -> input ids, mask, pixel values,
image grids; what ``ContentEncoder.prepare`` returns) and the text decoder's targets (``text_targets``).

Image size (one policy, docs/README_utgrec.md "Image sizes"): the encoder sees square images of side
``visual_side(image_size)``, ``utgrec.encoder.image_size`` rounded to a multiple of the vision tower's
``patch x merge`` (28 for Qwen2-VL): ``(side / 28)^2`` visual tokens per image (224 -> 64, 448 -> 256). Images
are read at that side straight from the stored bytes (drafted JPEG decode + one resize) and handed to the image
processor as they are (``do_resize=False``): its own ``min_pixels`` / ``max_pixels`` no longer decide the
resolution. An image of another size is resized to the side first.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_PROMPT = ("<|vision_start|>{image}<|vision_end|>\nThis is an image of an item. The item's information also "
                "includes: \"{text}\". Compress the image and text information into {L} tokens, representing content "
                "from coarse to fine granularity.\n{codes}")
TEXT_PROMPT = ("The item's information is: \"{text}\". Compress the text information into {L} tokens, representing "
               "content from coarse to fine granularity.\n{codes}")


def code_tokens(num_codes: int) -> list[str]:
    return [f"<CODE_{l + 1}>" for l in range(num_codes)]


def visual_side(image_size: int, factor: int = 28) -> int:
    """The encoder's image side: ``image_size`` rounded to a multiple of ``factor`` (patch x merge), >= ``factor``."""
    return max(factor, int(round(image_size / factor)) * factor)


def _square_uint8(im: Any, side: int) -> np.ndarray:
    """``(3, H, W)`` uint8 tensor / ``(H, W, 3)`` array / PIL image -> ``(side, side, 3)`` uint8 array."""
    if not isinstance(im, torch.Tensor):
        im = torch.from_numpy(np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)).permute(2, 0, 1)
    if tuple(im.shape[-2:]) != (side, side):
        im = F.interpolate(im[None].to(torch.uint8), size=(side, side), mode="bicubic", antialias=True)[0]
    return np.ascontiguousarray(im.permute(1, 2, 0).numpy())


class ItemPreparer:
    """Tokenizer (+ image processor) -> encoder inputs and text targets, on CPU, in any process.

    ``image_processor`` given: the Qwen2-VL prompts (image variant where an item has an image); otherwise the
    text backend's input (item text, then the L code tokens as a second segment)."""

    def __init__(self, tokenizer: Any, num_codes: int, max_text_tokens: int, image_processor: Any = None,
                 image_size: int = 224) -> None:
        self.tokenizer, self.num_codes, self.max_text_tokens = tokenizer, int(num_codes), int(max_text_tokens)
        self.image_processor = image_processor
        self.merge = int(getattr(image_processor, "merge_size", 2) or 2)
        self.patch = int(getattr(image_processor, "patch_size", 14) or 14)
        self.image_size = int(image_size)
        self.side = visual_side(self.image_size, self.patch * self.merge)

    @classmethod
    def from_pretrained(cls, backend: str, path: str, num_codes: int, max_text_tokens: int,
                        image_size: int = 224) -> "ItemPreparer":
        """What the content encoder of ``backend`` at ``path`` would prepare, without loading its weights."""
        from transformers import AutoImageProcessor, AutoTokenizer

        if backend == "text" and not path:
            from megarec.tokenizer.encoders import default_encoder_path

            path = str(default_encoder_path())
        tok = AutoTokenizer.from_pretrained(path)
        tok.add_tokens(code_tokens(num_codes), special_tokens=True)
        if backend != "qwen2vl":
            return cls(tok, num_codes, max_text_tokens)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return cls(tok, num_codes, max_text_tokens, AutoImageProcessor.from_pretrained(path), image_size)

    @property
    def qwen(self) -> bool:
        return self.image_processor is not None

    def visual_tokens(self) -> int:
        """Visual tokens per image in the encoder prompt."""
        return (self.side // (self.patch * self.merge)) ** 2

    def truncate(self, texts: Sequence[str]) -> list[str]:
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                             max_length=self.max_text_tokens)["input_ids"]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def encoder_inputs(self, texts: Sequence[str], images: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """The content encoder's inputs; ``images[i]`` ``None`` = the text-only prompt (ignored by the text
        backend)."""
        codes = "".join(code_tokens(self.num_codes))
        if not self.qwen:
            enc = self.tokenizer(self.truncate(texts), [codes] * len(texts), return_tensors="pt", padding=True,
                                 truncation="only_first", max_length=self.max_text_tokens + self.num_codes + 4)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        images = list(images) if images is not None else [None] * len(texts)
        prompts, pics = [], []
        for text, im in zip(self.truncate(texts), images):
            if im is None:
                prompts.append(TEXT_PROMPT.format(text=text, L=self.num_codes, codes=codes))
            else:
                prompts.append(IMAGE_PROMPT.format(text=text, L=self.num_codes, codes=codes, image="<IMAGE>"))
                pics.append(_square_uint8(im, self.side))
        out: dict[str, torch.Tensor] = {}
        if pics:
            vis = self.image_processor(images=pics, return_tensors="pt", do_resize=False)
            grids = vis["image_grid_thw"]
            out["pixel_values"], out["image_grid_thw"] = vis["pixel_values"], grids
            pads = iter(int(g.prod()) // self.merge ** 2 for g in grids)
            prompts = [p.replace("<IMAGE>", "<|image_pad|>" * next(pads)) if "<IMAGE>" in p else p for p in prompts]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        return out

    def text_targets(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, T]`` of each item text (no special tokens, at most ``max_tokens``) and their mask."""
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        T = max(1, max((len(x) for x in ids), default=0))
        out = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.bool)
        for i, x in enumerate(ids):
            out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = True
        return out, mask
