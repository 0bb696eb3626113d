"""The core layer: backbones (registry, weights, cut points), input transforms, the model that joins a backbone
and a flow head (the LightningModule every stage passes around) and pruned structures. Builds on flow/."""
