"""The SDXL pipeline's parity figures against diffusers on the tiny random SDXL base and refiner of the tests
(tests/helpers_xl.py), fp32 CPU: relative errors of the prompt encoding and of the final latents of each entry
point, with the arguments tests/test_pipeline_xl.py uses (the tests assert 1e-5 and 1e-4).

    python scripts/sdxl_parity_figures.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402

from tests.helpers import NEGATIVES, PROMPTS, disc_mask, picture, rel_err, run_ref  # noqa: E402
from tests.helpers_xl import SIZE, generators, ours_from, reference_pipelines  # noqa: E402

SECOND = ["a watercolour", "a charcoal sketch"]


def main() -> None:
    torch.set_num_threads(1)
    ref, ref_refiner = reference_pipelines()
    ours, refiner = ours_from(ref), ours_from(ref_refiner)
    want = ref.encode_prompt(PROMPTS, SECOND, num_images_per_prompt=1, do_classifier_free_guidance=True,
                             negative_prompt=NEGATIVES)
    context, added = ours._conditioning(PROMPTS, NEGATIVES, 1, None, True, prompts_2=SECOND)
    print(f"encode_prompt: context {rel_err(context[2:], want[0]):.2e}, negative {rel_err(context[:2], want[1]):.2e}, "
          f"pooled {rel_err(added['text_embeds'][2:], want[2]):.2e}")

    kw = dict(prompt_2=SECOND, negative_prompt=NEGATIVES, negative_prompt_2="oversaturated", num_inference_steps=3,
              guidance_scale=5.0, num_images_per_prompt=2, height=SIZE, width=SIZE, original_size=(512, 384),
              crops_coords_top_left=(16, 32), target_size=(48, 80), negative_original_size=(256, 256),
              negative_target_size=(64, 32))
    _, latents = run_ref(ref, PROMPTS, seed=7, n_images=4, **kw)
    print(f"txt2img latents: {rel_err(ours(PROMPTS, seed=7, output_type='latent', **kw).latents, latents):.2e}")

    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    kw = dict(strength=0.6, negative_prompt=NEGATIVES[0], num_inference_steps=4, original_size=(96, 128))
    _, latents = run_ref(img2img, PROMPTS[1], image=picture(5), seed=11, n_images=1, **kw)
    out = ours.img2img(PROMPTS[1], picture(5), seed=11, output_type="latent", **kw)
    print(f"img2img latents: {rel_err(out.latents, latents):.2e}")

    kw = dict(negative_prompt=NEGATIVES[1], num_inference_steps=5, guidance_scale=5.0)
    ref_base = ref(PROMPTS[0], generator=generators(2, 1), height=SIZE, width=SIZE, denoising_end=0.7,
                   output_type="latent", **kw).images
    base = ours(PROMPTS[0], seed=2, height=SIZE, width=SIZE, denoising_end=0.7, output_type="latent", **kw)
    refine = dict(denoising_start=0.7, aesthetic_score=7.5, negative_aesthetic_score=1.5, **kw)
    _, ref_final = run_ref(ref_refiner, PROMPTS[0], image=ref_base, seed=2, n_images=1, **refine)
    final = refiner.img2img(PROMPTS[0], base.latents, seed=2, output_type="latent", **refine)
    print(f"base + refiner: base latents {rel_err(base.latents, ref_base):.2e}, refiner latents "
          f"{rel_err(final.latents, ref_final):.2e}")

    inpaint = diffusers.StableDiffusionXLInpaintPipeline(**ref.components)
    inpaint.set_progress_bar_config(disable=True)
    kw = dict(strength=0.8, negative_prompt=NEGATIVES[0], num_inference_steps=4, guidance_scale=6.0)
    _, latents = run_ref(inpaint, PROMPTS[0], image=picture(6), mask_image=disc_mask(), seed=9, n_images=1,
                         height=SIZE, width=SIZE, **kw)
    out = ours.inpaint(PROMPTS[0], picture(6), disc_mask(), seed=9, output_type="latent", **kw)
    print(f"inpaint (blending) latents: {rel_err(out.latents, latents):.2e}")


if __name__ == "__main__":
    main()
