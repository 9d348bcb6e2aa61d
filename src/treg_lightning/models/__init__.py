"""The models: loading (hub id, folder, GGUF, alias), FSDP2 sharding, LoRA / QLoRA adapters,
export, and the one checkpoint reader."""
