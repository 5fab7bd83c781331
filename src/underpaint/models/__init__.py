"""Checkpoint files: headers, family detection, configs from shapes, module building, the models folder.

- ``header``: ``read_header`` (safetensors header only), ``load_state_dict`` (torch files with weights_only)
- ``detect``: ``Family``, ``ModelSpec``, ``detect(header)``
- ``configs`` / ``convert``: diffusers/transformers configs from shapes, original → diffusers names
- ``tokenizer``: offline CLIP tokenizers from the shipped BPE file
- ``loader``: ``load_model(path) -> LoadedModel`` for single files and diffusers folders
- ``flux`` / ``t5`` / ``gguf`` / ``flux_loader``: FLUX.1 (transformer, T5 encoder, GGUF files, ``load_flux``)
- ``hashes``, ``registry``, ``download``: A1111 hashes, the models folder, explicit hub downloads

Nothing is imported here, so ``import underpaint.models.registry`` stays light.
"""
