"""The ground floor: helpers every layer may use and that use no other layer (tree paths,
typed config sections, publishing files and directories whole, the XLA compilation cache)."""
