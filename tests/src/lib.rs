//! End-to-end tests: real containerd with ctr and a CRI client, the RuntimeClass handler, and real microVMs where the host can run them.
