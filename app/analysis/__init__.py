"""The outfit descriptor: body regions, named garment colours, garment types."""
