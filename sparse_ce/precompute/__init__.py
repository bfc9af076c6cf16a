"""Pre-computed candidates (MixEncoder, "Once is Enough", Wang et al.): convert, candidate store, index, rank, bench."""
