"""SkyPrompt training: tokenizer training, data readers, losses, train loop, evaluation, pseudo-label refinement."""
