/* A service holding an io_uring instance (io_uring_setup, syscall 425, no liburing) with its
 * submission ring mapped, as every io_uring user does: CRIU 4.2.1 cannot dump either. */
#include <linux/io_uring.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int fd = (int)syscall(425, 8, &p);
    if (fd < 0) {
        perror("io_uring_setup");
        return 1;
    }
    size_t len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    void *sq = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    printf("io_uring fd %d ready\n", fd);
    fflush(stdout);
    for (;;)
        pause();
}
