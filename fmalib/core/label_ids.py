"""Label-map conventions every layer shares: 0 is background, 1..C the classes in params order, 255 ignored."""

BACKGROUND = 0
IGNORE = 255
