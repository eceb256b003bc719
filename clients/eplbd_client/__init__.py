"""eplbd_client: the library an inference engine embeds in each EP rank."""
