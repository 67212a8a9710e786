/* The pod sandbox's first process (testinfra/infraimages.py builds it into the pause image).
 *
 * It holds the pod's namespaces for the pod's containers, reaps the orphans the kernel hands it
 * as the pod's pid 1, and exits when containerd stops the sandbox (SIGINT or SIGTERM). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { _exit(128 + sig); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction action = {0};
    action.sa_handler = quit;
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    action.sa_handler = reap;
    action.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &action, NULL);
    for (;;) {
        pause();
    }
}
