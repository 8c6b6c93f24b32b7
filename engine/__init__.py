"""earkit.engine: Janus-Pro loading, the CFG sampler, the erasure objectives and trainer, checkpoints.

    from earkit.engine import EraseConfig, erase
    result = erase(EraseConfig(model="deepseek-community/Janus-Pro-1B", concept="church", anchor="cinema"))
"""

if __name__ != "earkit.engine":  # imported as a top-level `engine`: see earkit/_source_folder.py
    from earkit._source_folder import refusal

    __getattr__ = refusal(__name__)
else:
    from .adapters import AdapterStack, merged_weights
    from .checkpoint import (apply_trainable, erasure_tensors, export_checkpoint, export_model, load_checkpoint,
                             save_checkpoint)
    from .model import encode_prompts, image_hidden_states, image_logits, load_janus, prompt_text
    from .pair_files import PromptPair, load_pairs, pairs_from_concept
    from .sampler import decode_images, sample_image_tokens, write_samples
    from .trainer import EraseConfig, EraseResult, erase

    __all__ = [
        "EraseConfig", "EraseResult", "erase",
        "load_janus", "prompt_text", "encode_prompts", "image_hidden_states", "image_logits",
        "sample_image_tokens", "decode_images", "write_samples",
        "PromptPair", "load_pairs", "pairs_from_concept",
        "save_checkpoint", "load_checkpoint", "apply_trainable", "export_model", "export_checkpoint",
        "erasure_tensors", "AdapterStack", "merged_weights",
    ]
