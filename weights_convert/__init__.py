"""weights_convert: read Stable Diffusion checkpoints into ldm's models, through our own key-mapping tables.

- `safetensors_file.py`: the format, read by memory map, written by streaming.
- `transforms.py`: the named tensor transforms (1x1 conv -> linear, fused q/k/v split).
- `unet_rules.py`, `vae_rules.py`, `clip_rules.py`: the declarative tables, index arithmetic in one function each.
- `checkpoint.py`: the original single file: layout and family detection, the complete table.
- `convert.py`: strict verification and the conversion itself.
- `load.py`: `load_components` / `load_pipeline` for single files, diffusers folders and hub ids.
- `export.py`: our weights back to the diffusers folder layout.
- `__main__.py`: `python -m weights_convert table | inspect | export`.

Never imports diffusers or transformers: they are the test suite's references, not ours.
"""
