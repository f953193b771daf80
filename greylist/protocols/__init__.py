"""Protocol codecs: push decoders with their caps, and reply formatting."""
