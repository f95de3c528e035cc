"""BPF C sources; shipped as package data so an installed meshintercept can compile them."""
