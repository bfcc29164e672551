"""2D slice networks (run over volumes with :class:`medvol.networks.slice_adapter.SliceAdapter`)."""
