"""hae_fx in one page: the trained SynthVLM answers questions about a scene with a full KV cache and with `hae`
(the `hae-fx demo` command; `hae_fx/demo.py` is the code to read)."""

from hae_fx import logs
from hae_fx.demo import main

if __name__ == "__main__":
    logs.configure("INFO")  # announce each compile before it starts, as `hae-fx demo` does
    main()
