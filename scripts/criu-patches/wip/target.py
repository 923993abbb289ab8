import os, time, hashlib, sys
D = os.environ.get("WP_DIR", "/tmp/uffd-wp-proto")
N = 16384
mem = bytearray(N * 4096)
for i in range(N):
    mem[i*4096:(i*4096)+8] = i.to_bytes(8, "little")
    mem[i*4096+100] = 1
open(f"{D}/ready", "w").write(str(os.getpid()))
rounds = 0
while True:
    time.sleep(0.01)
    if os.path.exists(f"{D}/go"):
        os.unlink(f"{D}/go")
        rounds += 1
        for i in range(0, N, 100):
            mem[i*4096+200] = (rounds + 1) & 0xff
        open(f"{D}/done", "w").write(str(rounds))
    if os.path.exists(f"{D}/check"):
        os.unlink(f"{D}/check")
        open(f"{D}/result", "w").write(hashlib.sha256(mem).hexdigest())
