"""Results back to the PACS: keep them in the archive, queue them per destination, C-STORE them."""
