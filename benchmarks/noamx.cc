// noamx: runs a command with AMX refused to it and to every process it starts, as on a CPU or
// kernel that grants no AMX tile state: Linux hands AMX to a process only after
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), and a seccomp filter makes that call fail
// with EPERM. Libraries then take their code for a CPU without AMX: our bf16 product kernel its
// AVX512-BF16 pair dots, XLA's YNNPACK dot and torch's oneDNN their AVX-512 code. With the
// instruction-set settings of benchmarks/results/amx_xeon/no_amx_simulated/, an AMX Xeon then
// stands in for the Xeon without AMX in bf16 too (YNNPACK ignores --xla_cpu_max_isa).
//
//     c++ -O2 -o noamx benchmarks/noamx.cc && ./noamx .venv/bin/python benchmarks/cpu_quick.py ...
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

constexpr unsigned kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM (asm/prctl.h)

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: noamx COMMAND [ARGS...]: runs COMMAND with AMX refused to it\n");
    return 2;
  }
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_arch_prctl, 0, 3),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[0])),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kReqXcompPerm, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog program = {sizeof(filter) / sizeof(filter[0]), filter};
  // No new privileges: what an unprivileged process needs to install a filter.
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
      prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) {
    perror("noamx: could not install the seccomp filter");
    return 1;
  }
  execvp(argv[1], argv + 1);
  fprintf(stderr, "noamx: could not run %s: %s\n", argv[1], strerror(errno));
  return 127;
}
