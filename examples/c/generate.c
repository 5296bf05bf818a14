/* The README's C example: a local 3-node swarm, a client, and a streamed generation.
 *
 *   cc -Iinclude examples/c/generate.c -Ltarget/release -lneuroshard -o generate
 *   LD_LIBRARY_PATH=target/release ./generate models/SmolLM2-135M-Instruct.Q4_1.gguf */
#include <stdio.h>

#include "neuroshard.h"

static int32_t print_piece(const char *piece, void *user_data) {
  (void)user_data;
  fputs(piece, stdout);
  fflush(stdout);
  return 0; /* non-zero would stop the generation */
}

int main(int argc, char **argv) {
  const char *model = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  ns_swarm *swarm = NULL;
  ns_client *client = NULL;
  char *address = NULL;
  ns_init(0, NULL); /* once, before other threads start */
  if (ns_swarm_start(model, 3, 1, NS_MODE_EXACT, &swarm) != NS_STATUS_OK ||
      ns_swarm_address(swarm, &address) != NS_STATUS_OK ||
      ns_client_connect((const char *const[]){address}, 1, &client) != NS_STATUS_OK) {
    fprintf(stderr, "error: %s\n", ns_last_error());
    return 1;
  }
  ns_generate_params params = {0};
  params.max_tokens = 24;
  if (ns_client_generate(client, "The future of AI is", &params, print_piece, NULL, NULL) != NS_STATUS_OK) {
    fprintf(stderr, "error: %s\n", ns_last_error());
    return 1;
  }
  putchar('\n');
  ns_client_free(client);
  ns_string_free(address);
  ns_swarm_free(swarm);
  return 0;
}
