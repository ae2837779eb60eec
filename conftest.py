"""What the test files share: helpers that more than one of them uses."""

import torch

import cogvla_mini as cm


def randomize_films(model, router=True, vision=True, std=0.5):
    """Give the (zero-initialised) FiLM output layers real weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.llm.layers:
            if router and isinstance(layer, cm.LFPDecoderLayer):
                for mlp in (layer.router.film_scale, layer.router.film_shift):
                    mlp[-1].weight.copy_(torch.randn(mlp[-1].weight.shape, generator=g) * std)
        if vision:
            for vit in (model.vision.dino, model.vision.siglip):
                for block in vit.blocks:
                    for film in (block.film_scale, block.film_shift):
                        film.weight.copy_(torch.randn(film.weight.shape, generator=g) * std)
