/* C API test, built by scripts/test.sh against include/neuroshard.h and libneuroshard.
 *
 *   test_neuroshard tiny  FIXTURES_DIR              tiny-llama logits vs the reference, split
 *                                                   over 2 engines, and every error path
 *   test_neuroshard swarm MODEL EXPECTED_TEXT_FILE  SmolLM2 local swarm: greedy text equals the
 *                                                   reference, streaming through the callback
 *
 * Prints one "ok ..." line per check and "N passed, 0 failed" at the end; exits 1 on the
 * first failed check. The tiny mode is what valgrind runs. */
#include "neuroshard.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);               \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, " (last error: %s)\n", ns_last_error());             \
      exit(1);                                                             \
    }                                                                      \
    passed++;                                                              \
    printf("ok ");                                                         \
    printf(__VA_ARGS__);                                                   \
    printf("\n");                                                          \
  } while (0)

/* Expects `call` to fail with `status` and to leave a non-empty last error. */
#define EXPECT_STATUS(call, status, what)                                  \
  do {                                                                     \
    ns_status s_ = (call);                                                 \
    CHECK(s_ == (status) && ns_last_error()[0] != '\0',                    \
          "%s -> status %u (want %u): %s", what, (unsigned)s_,             \
          (unsigned)(status), ns_last_error());                            \
  } while (0)

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
    fclose(f);
    free(buf);
    return NULL;
  }
  buf[n] = '\0';
  fclose(f);
  *len = (size_t)n;
  return buf;
}

/* The data of tensor `name` in a safetensors file (header: u64 length + JSON). */
static const char *tensor_data(const char *file, size_t len, const char *name, size_t *bytes) {
  uint64_t header_len;
  memcpy(&header_len, file, 8);
  char *header = malloc(header_len + 1);
  memcpy(header, file + 8, header_len);
  header[header_len] = '\0';
  char key[128];
  snprintf(key, sizeof key, "\"%s\"", name);
  const char *at = strstr(header, key);
  const char *offsets = at ? strstr(at, "\"data_offsets\":[") : NULL;
  unsigned long long begin = 0, end = 0;
  if (!offsets || sscanf(offsets, "\"data_offsets\":[%llu,%llu]", &begin, &end) != 2) {
    free(header);
    return NULL;
  }
  free(header);
  if (8 + header_len + end > len) return NULL;
  *bytes = (size_t)(end - begin);
  return file + 8 + header_len + begin;
}

static void tiny(const char *fixtures) {
  char model[1024], ref_path[1024];
  snprintf(model, sizeof model, "%s/tiny-llama", fixtures);
  snprintf(ref_path, sizeof ref_path, "%s/tiny-llama/reference.safetensors", fixtures);
  size_t ref_len = 0;
  char *ref = read_file(ref_path, &ref_len);
  CHECK(ref != NULL, "read %s", ref_path);
  size_t id_bytes = 0, logit_bytes = 0;
  const char *ids_raw = tensor_data(ref, ref_len, "input_ids", &id_bytes);
  const char *logits_raw = tensor_data(ref, ref_len, "logits", &logit_bytes);
  CHECK(ids_raw && id_bytes == 2 * 12 * 8 && logits_raw && logit_bytes == 2 * 12 * 256 * 4,
        "reference tensors input_ids [2,12] and logits [2,12,256] found");
  uint32_t ids[24];
  for (int i = 0; i < 24; i++) {
    int64_t v;
    memcpy(&v, ids_raw + 8 * i, 8);
    ids[i] = (uint32_t)v;
  }
  float *want = malloc(logit_bytes);
  memcpy(want, logits_raw, logit_bytes);

  uint32_t threads = 0;
  CHECK(ns_init(1, &threads) == NS_STATUS_OK && threads >= 1, "ns_init -> %u thread(s)", threads);
  CHECK(strlen(ns_version()) > 0, "ns_version %s", ns_version());

  /* Whole model, then split over two engines: the same logits as the reference. */
  ns_engine *whole = NULL, *first = NULL, *second = NULL;
  CHECK(ns_engine_load(model, 0, 4, NS_MODE_EXACT, &whole) == NS_STATUS_OK, "load 0..4");
  CHECK(ns_engine_load(model, 0, 2, NS_MODE_EXACT, &first) == NS_STATUS_OK, "load 0..2");
  CHECK(ns_engine_load(model, 2, 4, NS_MODE_EXACT, &second) == NS_STATUS_OK, "load 2..4");
  ns_engine_info info;
  CHECK(ns_engine_info_get(first, &info) == NS_STATUS_OK && info.hidden_size == 64 &&
            info.vocab_size == 256 && info.layers == 4,
        "info: hidden %u vocab %u layers %u", info.hidden_size, info.vocab_size, info.layers);

  size_t n_logits = 2 * 12 * 256, written = 0;
  float *got = malloc(n_logits * sizeof(float));
  CHECK(ns_engine_forward_tokens(whole, ids, 2, 12, 0, 0, got, n_logits, &written) == NS_STATUS_OK &&
            written == n_logits,
        "forward tokens through 0..4 (%zu floats)", written);
  float worst = 0;
  for (size_t i = 0; i < n_logits; i++) worst = fmaxf(worst, fabsf(got[i] - want[i]));
  CHECK(worst < 1e-4f, "one engine: max |logit - reference| = %g < 1e-4", worst);

  size_t n_hidden = 2 * 12 * 64;
  float *hidden = malloc(n_hidden * sizeof(float));
  CHECK(ns_engine_forward_tokens(first, ids, 2, 12, 0, 0, hidden, n_hidden, &written) == NS_STATUS_OK &&
            written == n_hidden,
        "forward tokens through 0..2 gives hidden states");
  CHECK(ns_engine_forward_hidden(second, hidden, 2, 12, 64, 0, 0, got, n_logits, &written) == NS_STATUS_OK,
        "forward hidden through 2..4");
  worst = 0;
  for (size_t i = 0; i < n_logits; i++) worst = fmaxf(worst, fabsf(got[i] - want[i]));
  CHECK(worst < 1e-4f, "two engines: max |logit - reference| = %g < 1e-4", worst);

  /* A session: prefill 11 tokens, then the 12th: its logits equal the full pass's. */
  CHECK(ns_engine_open_session(whole, 7) == NS_STATUS_OK, "open session 7");
  CHECK(ns_engine_forward_tokens(whole, ids, 1, 11, 7, 0, got, n_logits, &written) == NS_STATUS_OK,
        "session prefill of 11 positions");
  CHECK(ns_engine_forward_tokens(whole, ids + 11, 1, 1, 7, 11, got, n_logits, &written) == NS_STATUS_OK &&
            written == 256,
        "session step at position 11");
  worst = 0;
  for (size_t i = 0; i < 256; i++) worst = fmaxf(worst, fabsf(got[i] - want[11 * 256 + i]));
  CHECK(worst < 1e-4f, "cached step: max |logit - reference| = %g < 1e-4", worst);

  /* Error paths: typed status and a message, never a crash. */
  ns_engine *none = NULL;
  EXPECT_STATUS(ns_engine_load(NULL, 0, 1, NS_MODE_EXACT, &none), NS_STATUS_NULL_ARGUMENT, "null path");
  EXPECT_STATUS(ns_engine_load(model, 0, 1, NS_MODE_EXACT, NULL), NS_STATUS_NULL_ARGUMENT, "null out");
  EXPECT_STATUS(ns_engine_load("/nonexistent/model.gguf", 0, 1, NS_MODE_EXACT, &none),
                NS_STATUS_MODEL_FILE, "missing model file");
  char json_path[1024];
  snprintf(json_path, sizeof json_path, "%s/tiny-llama/reference.json", fixtures);
  EXPECT_STATUS(ns_engine_load(json_path, 0, 1, NS_MODE_EXACT, &none), NS_STATUS_UNSUPPORTED_MODEL,
                "not a model file");
  EXPECT_STATUS(ns_engine_load(ref_path, 0, 1, NS_MODE_EXACT, &none), NS_STATUS_CORRUPT_MODEL,
                "safetensors without the model's tensors");
  EXPECT_STATUS(ns_engine_load(model, 3, 9, NS_MODE_EXACT, &none), NS_STATUS_SLICE_OUT_OF_RANGE,
                "slice past the last layer");
  CHECK(none == NULL, "no handle after a failed load");
  EXPECT_STATUS(ns_engine_forward_tokens(NULL, ids, 1, 1, 0, 0, got, n_logits, NULL),
                NS_STATUS_NULL_ARGUMENT, "null engine");
  EXPECT_STATUS(ns_engine_forward_tokens(whole, NULL, 1, 1, 0, 0, got, n_logits, NULL),
                NS_STATUS_NULL_ARGUMENT, "null tokens");
  EXPECT_STATUS(ns_engine_forward_tokens(whole, ids, 1, 1, 0, 0, NULL, n_logits, NULL),
                NS_STATUS_NULL_ARGUMENT, "null output");
  EXPECT_STATUS(ns_engine_forward_tokens(whole, ids, 2, 12, 0, 0, got, 10, NULL),
                NS_STATUS_INVALID_ARGUMENT, "output buffer too small");
  uint32_t bad_id = 256;
  EXPECT_STATUS(ns_engine_forward_tokens(whole, &bad_id, 1, 1, 0, 0, got, n_logits, NULL),
                NS_STATUS_BAD_INPUT, "token id outside the vocabulary");
  EXPECT_STATUS(ns_engine_forward_hidden(second, hidden, 2, 12, 63, 0, 0, got, n_logits, NULL),
                NS_STATUS_BAD_INPUT, "hidden width 63");
  EXPECT_STATUS(ns_engine_forward_hidden(first, hidden, 2, 12, 64, 0, 0, got, n_logits, NULL),
                NS_STATUS_BAD_INPUT, "hidden states into layer 0");
  EXPECT_STATUS(ns_engine_forward_tokens(whole, ids, 1, 1, 99, 0, got, n_logits, NULL),
                NS_STATUS_SESSION, "unknown session");
  EXPECT_STATUS(ns_engine_open_session(whole, 7), NS_STATUS_SESSION, "session opened twice");
  EXPECT_STATUS(ns_engine_forward_tokens(whole, ids, 1, 1, 7, 50, got, n_logits, NULL),
                NS_STATUS_SESSION, "gap in the session's positions");
  CHECK(ns_engine_close_session(whole, 7) == NS_STATUS_OK, "close session 7");
  EXPECT_STATUS(ns_engine_info_get(NULL, &info), NS_STATUS_NULL_ARGUMENT, "info of null");
  EXPECT_STATUS(ns_swarm_start(NULL, 3, 1, NS_MODE_EXACT, NULL), NS_STATUS_NULL_ARGUMENT, "swarm null model");
  ns_swarm *swarm = NULL;
  EXPECT_STATUS(ns_swarm_start("/nonexistent.gguf", 3, 1, NS_MODE_EXACT, &swarm), NS_STATUS_MODEL_FILE,
                "swarm of a missing model");
  EXPECT_STATUS(ns_swarm_address(NULL, NULL), NS_STATUS_NULL_ARGUMENT, "address of null swarm");
  ns_node *node = NULL;
  EXPECT_STATUS(ns_node_start(model, 0, 9, 0, NULL, 0, NS_MODE_EXACT, &node), NS_STATUS_SLICE_OUT_OF_RANGE,
                "node with a bad slice");
  EXPECT_STATUS(ns_node_address(NULL, NULL), NS_STATUS_NULL_ARGUMENT, "address of null node");
  ns_client *client = NULL;
  EXPECT_STATUS(ns_client_connect(NULL, 0, &client), NS_STATUS_INVALID_ARGUMENT, "connect without peers");
  const char *garbage[] = {"not-an-address"};
  EXPECT_STATUS(ns_client_connect(garbage, 1, &client), NS_STATUS_NETWORK, "connect to garbage");
  EXPECT_STATUS(ns_client_generate(NULL, "x", NULL, NULL, NULL, NULL), NS_STATUS_NULL_ARGUMENT,
                "generate on null client");
  CHECK(ns_engine_open_session(whole, 8) == NS_STATUS_OK && ns_last_error()[0] == '\0',
        "a success clears the last error");

  /* Frees accept null. */
  ns_engine_free(NULL);
  ns_swarm_free(NULL);
  ns_node_free(NULL);
  ns_client_free(NULL);
  ns_string_free(NULL);
  ns_engine_free(whole);
  ns_engine_free(first);
  ns_engine_free(second);
  free(got);
  free(hidden);
  free(want);
  free(ref);
}

struct collected {
  char text[8192];
  int pieces;
  int stop_after;
};

static int32_t on_piece(const char *piece, void *user_data) {
  struct collected *c = user_data;
  strncat(c->text, piece, sizeof c->text - strlen(c->text) - 1);
  c->pieces++;
  return c->stop_after > 0 && c->pieces >= c->stop_after;
}

static void swarm(const char *model, const char *expected_path) {
  size_t len = 0;
  char *expected = read_file(expected_path, &len);
  CHECK(expected != NULL && len > 0, "expected text read (%zu bytes)", len);
  CHECK(ns_init(0, NULL) == NS_STATUS_OK, "ns_init");
  ns_swarm *s = NULL;
  CHECK(ns_swarm_start(model, 3, 1, NS_MODE_EXACT, &s) == NS_STATUS_OK, "3-node SmolLM2 swarm started");
  char *address = NULL;
  CHECK(ns_swarm_address(s, &address) == NS_STATUS_OK && strchr(address, '@'), "address %s", address);
  ns_client *client = NULL;
  const char *peers[] = {address};
  CHECK(ns_client_connect(peers, 1, &client) == NS_STATUS_OK, "client connected");

  struct collected c = {{0}, 0, 0};
  ns_generate_params params = {0};
  params.max_tokens = 24;
  params.ignore_eos = 1;
  char *text = NULL;
  CHECK(ns_client_generate(client, "The future of AI is", &params, on_piece, &c, &text) == NS_STATUS_OK,
        "generate 24 greedy tokens");
  CHECK(strcmp(text, expected) == 0, "text equals the reference: \"%s\"", text);
  CHECK(strcmp(c.text, text) == 0 && c.pieces > 1, "%d streamed pieces join to the same text", c.pieces);
  ns_string_free(text);

  struct collected stop = {{0}, 0, 3};
  text = NULL;
  ns_status st = ns_client_generate(client, "The future of AI is", &params, on_piece, &stop, &text);
  CHECK(st == NS_STATUS_CANCELLED && stop.pieces == 3 && text != NULL && strlen(text) < strlen(expected),
        "a non-zero callback return stops the generation after 3 pieces (status %u)", (unsigned)st);
  ns_string_free(text);

  ns_client_free(client);
  ns_string_free(address);
  ns_swarm_free(s);

  // Replicated: two ranges of three replicas, every receiver votes; the text is the same and
  // the client's reputation table lists the replicas it voted on, none of them banned.
  CHECK(ns_swarm_start(model, 2, 3, NS_MODE_EXACT, &s) == NS_STATUS_OK, "2 x 3 replicated swarm started");
  CHECK(ns_swarm_address(s, &address) == NS_STATUS_OK, "address %s", address);
  ns_client_options options = {0};
  options.redundancy = 3;
  const char *replicated_peers[] = {address};
  CHECK(ns_client_connect_with(replicated_peers, 1, &options, &client) == NS_STATUS_OK,
        "client connected with redundancy 3");
  params.max_tokens = 8;
  text = NULL;
  CHECK(ns_client_generate(client, "The future of AI is", &params, NULL, NULL, &text) == NS_STATUS_OK,
        "replicated generation");
  CHECK(strncmp(text, expected, strlen(text)) == 0 && strlen(text) > 0,
        "replicated text is the reference's start: \"%s\"", text);
  ns_string_free(text);
  ns_trust_row *rows = NULL;
  size_t n_rows = 0;
  CHECK(ns_client_trust_table(client, &rows, &n_rows) == NS_STATUS_OK && n_rows >= 3,
        "trust table has %zu rows", n_rows);
  for (size_t i = 0; i < n_rows; i++) {
    CHECK(rows[i].state != NS_TRUST_STATE_BANNED && rows[i].agreed > 0 && strlen(rows[i].node) == 64,
          "row %zu: %.10s state %u, %llu agreed (%s)", i, rows[i].node, (unsigned)rows[i].state,
          (unsigned long long)rows[i].agreed, rows[i].reason);
  }
  ns_trust_table_free(rows, n_rows);
  EXPECT_STATUS(ns_client_trust_table(NULL, &rows, &n_rows), NS_STATUS_NULL_ARGUMENT, "trust table of null");
  ns_client_free(client);
  ns_string_free(address);
  ns_swarm_free(s);
  free(expected);
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "tiny") == 0) {
    tiny(argv[2]);
  } else if (argc == 4 && strcmp(argv[1], "swarm") == 0) {
    swarm(argv[2], argv[3]);
  } else {
    fprintf(stderr, "usage: %s tiny FIXTURES | swarm MODEL EXPECTED_TEXT\n", argv[0]);
    return 2;
  }
  printf("%d passed, 0 failed\n", passed);
  return 0;
}
