"""Model layers that compression stages insert: fake-quantized convs / linears
(:mod:`.quant`) and exit heads with the dynamic-inference wrapper (:mod:`.exits`)."""
