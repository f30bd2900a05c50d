"""Helpers (not a test module) for tests that build Hugging Face iGPT models: random weights that make logits vary."""

import torch
import transformers


def random_hf_model(seed: int, **config) -> "transformers.ImageGPTForCausalImageModeling":
    """An eval-mode HF model (dropouts 0) whose every weight is random (lm_head and norms too) and biases zero.

    Args:
      seed: torch seed.
      **config: `ImageGPTConfig` fields (n_layer, n_embd, n_head, n_positions, vocab_size).
    """
    torch.manual_seed(seed)
    hf_config = transformers.ImageGPTConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config)
    model = transformers.ImageGPTForCausalImageModeling(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "ln_" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if "wte" in name or "wpe" in name else 0.15)
    return model
