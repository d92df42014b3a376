"""Class names as people read them: CUB-style folder names made readable, and the birds'
English names where the folder names lost them."""

from __future__ import annotations

__all__ = ["COMMON_NAMES", "display_name"]

# CUB-200-2011's folder names lost their apostrophes, and one is a genus: the birds' English names.
COMMON_NAMES = {
    "Anna_Hummingbird": "Anna's Hummingbird", "Baird_Sparrow": "Baird's Sparrow", "Bewick_Wren": "Bewick's Wren",
    "Brandt_Cormorant": "Brandt's Cormorant", "Brewer_Blackbird": "Brewer's Blackbird", "Brewer_Sparrow": "Brewer's Sparrow",
    "Chuck_will_Widow": "Chuck-will's-widow", "Clark_Nutcracker": "Clark's Nutcracker", "Forsters_Tern": "Forster's Tern",
    "Geococcyx": "Greater Roadrunner", "Harris_Sparrow": "Harris's Sparrow", "Heermann_Gull": "Heermann's Gull",
    "Henslow_Sparrow": "Henslow's Sparrow", "Le_Conte_Sparrow": "LeConte's Sparrow", "Lincoln_Sparrow": "Lincoln's Sparrow",
    "Nelson_Sharp_tailed_Sparrow": "Nelson's Sparrow", "Sayornis": "Say's Phoebe", "Scott_Oriole": "Scott's Oriole",
    "Swainson_Warbler": "Swainson's Warbler", "Whip_poor_Will": "Whip-poor-will", "Wilson_Warbler": "Wilson's Warbler",
}


def display_name(label: str) -> str:
    """A class folder name made readable: ``Black_footed_Albatross`` -> ``Black-footed Albatross``,
    ``Clark_Nutcracker`` -> ``Clark's Nutcracker`` (:data:`COMMON_NAMES`).

    Only underscore-separated names (CUB's style) are rewritten; a name typed with spaces is kept.
    """
    if label in COMMON_NAMES:
        return COMMON_NAMES[label]
    if "_" not in label:
        return label
    words = label.replace("_", " ").split()
    out = []
    for word in words:
        if out and word[:1].islower():  # "footed" after "Black": a hyphenated compound
            out[-1] += "-" + word
        else:
            out.append(word)
    return " ".join(out)
