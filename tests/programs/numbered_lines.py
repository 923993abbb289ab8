"""A batch job for tests/reboot.rs.

`numbered_lines.py lines PATH [PAD]`: opens PATH with "w" (as a job writing results does),
optionally writes a first line of PAD '#' characters, then appends the lines 1, 2, 3, ... one
write each, forever; the counter lives only in memory, so a restored job continues from the
checkpoint's count.

`numbered_lines.py hold PATH`: holds PATH open for reading and sleeps.
"""
import sys
import time

mode, path = sys.argv[1], sys.argv[2]
if mode == "hold":
    f = open(path)
    print("holding", flush=True)
    while True:
        time.sleep(1)
f = open(path, "w")
if len(sys.argv) > 3:
    f.write("#" * int(sys.argv[3]) + "\n")
    f.flush()
n = 0
print("writing", flush=True)
while True:
    n += 1
    f.write(f"{n}\n")
    f.flush()
    time.sleep(0.02)
