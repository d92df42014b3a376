"""The default model's recipes, one per version, and the photo pack they can train from.

    python -m resnext.recipes.cub100      # v4: the ResNeXt, distilled from the teacher on CUB-100
    python -m resnext.recipes.detector    # v5: v4's ResNeXt with the bird detector and verdicts
    python -m resnext.recipes.v6          # v6: the whole ResNeXt distilled again, v5's detector
    python -m resnext pack ...            # the photo pack (:mod:`resnext.recipes.pack`)

Training code: serving never imports this package. (The model card says how the older names in
the default model's provenance map to these.)
"""
