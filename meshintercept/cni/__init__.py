"""CNI chained plugin (meshintercept-cni)."""
