"""The AWS Inferentia/Trainium backend: torch_neuronx (through torch_xla) on NeuronCores."""
