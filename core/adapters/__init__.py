"""Codecs for models from other libraries. Each adapter imports its library only when used, so
`import exact_encode` never needs them: `from exact_encode.adapters.diffusers import diffusers_codec`."""
