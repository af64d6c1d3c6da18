"""Using what was trained: `difftune generate` (text, image and inpainting with ControlNets, LoRAs and
schedulers), `difftune merge` (LoRAs fused into a full pipeline) and the file conventions of their outputs.

- `generate`: the command; checks every input before the model loads, then samples.
- `loras`: LoRA specs (``PATH[:SCALE]``), which family and resolution a LoRA was trained for, and
  loading them into a pipeline with one-line errors (kohya files converted with `difftune.export`).
- `controlnet`: ControlNet specs and models, control images from photos (canny, depth).
- `img2img`: init images, masks, strength.
- `schedulers`: the sampler names and their diffusers classes.
- `naming`: PNG files with their parameters, names that never collide, ``images.jsonl``, contact sheets.
- `merge`: the command that fuses LoRAs into the base and writes a pipeline folder.

The family decides which diffusers pipeline class serves each task (``Family.task_pipelines``,
``controlnet_class``, ``schedulers``); nothing here asks which family it has.
"""
