"""Test helpers shipped with the package: the contract suite and the one-machine test cluster."""
