// Command serve is an OpenAI-style HTTP server for one base model with several adapters: the
// request's "model" field picks an adapter by name, or the base model by its own name.
//
//	go run ./examples/serve -addr 127.0.0.1:8080 -adapter a=DIR_A -adapter b=DIR_B
//
// serves the embedded stories260K (or -model DIR: a Hugging Face folder of any family
// peft/llama reads) under the name stories260K (-name) and an adapter folder of any method
// package peft/methods loads (LoRA, DoRA, IA³, prompt or prefix tuning, ...) under each name:
//
//	curl -s localhost:8080/v1/models
//	curl -s localhost:8080/v1/completions -H 'Content-Type: application/json' \
//	  -d '{"model": "a", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}'
//	curl -sN localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \
//	  -d '{"model": "b", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 16, "stream": true}'
//
// # API
//
// POST /v1/completions takes OpenAI's model, prompt (a string), max_tokens (default 16, at most
// -max-tokens), temperature (default 1; 0 decodes greedily), top_p, seed, stop (a string or up
// to 4) and stream; POST /v1/chat/completions takes messages [{role, content}] instead of
// prompt (and max_completion_tokens as a synonym of max_tokens). Both answer in OpenAI's
// shapes, or with "stream": true as server-sent events, one chunk per piece of text as the
// tokens are made, then "data: [DONE]". A completion's prompt is tokenized as the tokenizer's
// post-processor has it (Llama's <s>); a chat is rendered with the model's chat template
// (package peft/chat) and tokenized as the template writes it, as examples/generate -chat does; a
// model without a template (stories260K) gets a plain one, "role: content" per line ending with
// "assistant:". Generation stops at the model's end-of-sequence ids and the tokenizer's </s>
// (and the template's eos_token in a chat: finish_reason "stop"), at a stop string ("stop", the
// text cut before it) or after max_tokens ("length"). GET /v1/models lists the names, GET
// /healthz answers {"status": "ok"}. The text is examples/generate's for the same prompt and
// options, sampled text with the same seed included.
//
// Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 400 for bad JSON or a bad
// field (named in param), a prompt longer than the model takes or max_tokens beyond the
// ceiling; 404 for an unknown model (naming the served ones) or path; 405 for a wrong method;
// 413 for a body over -max-body bytes; 503 when -queue requests already wait; 504 past
// -request-timeout. SIGINT or SIGTERM shut the server down gracefully: new connections are
// refused, requests in flight finish.
//
// # Scheduling
//
// One scheduler goroutine owns the models: requests wait in a bounded queue and it runs them,
// taking up to engine.maxBatch() queued requests at a time (of any adapters) into one call of
// the engine. Parallel generations on the shared cores would only slow each other, and a
// batched engine needs one owner of its slots, so nothing else touches the models. The engine
// is a small interface (models, maxLength, maxBatch, generate with a per-token emit). Its
// implementation, batchEngine, serves the base and every plain LoRA adapter from one lora/multi
// model (each adapter in a slot: a batch mixes them in one graph, with the key/value cache, each
// row's prompt length and options its own) and any other adapter (DoRA, IA³, prompt or prefix
// tuning) on its own copy of the base (methods.Apply), batched by adapter; up to -max-batch
// requests run together, each streaming through generate.Config.OnToken.
package main

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"peft/peft/stories260k"
)

// adapterFlags collects the repeatable -adapter name=DIR.
type adapterFlags []adapterSpec

func (a *adapterFlags) String() string {
	parts := make([]string, len(*a))
	for i, s := range *a {
		parts[i] = s.name + "=" + s.dir
	}
	return strings.Join(parts, ",")
}

func (a *adapterFlags) Set(v string) error {
	name, dir, ok := strings.Cut(v, "=")
	if !ok || name == "" || dir == "" {
		return fmt.Errorf("want name=DIR, got %q", v)
	}
	*a = append(*a, adapterSpec{name: name, dir: dir})
	return nil
}

func main() {
	cfg := DefaultConfig()
	var adapters adapterFlags
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
	modelDir := flag.String("model", "", "Hugging Face model folder (default: the embedded stories260K)")
	name := flag.String("name", "", "the base model's name in requests (default: stories260K, or -model's folder name)")
	flag.Var(&adapters, "adapter", "adapter to serve, name=DIR (repeatable): a folder peft/methods loads")
	flag.Int64Var(&cfg.MaxBodyBytes, "max-body", cfg.MaxBodyBytes, "largest request body in bytes")
	flag.IntVar(&cfg.MaxTokens, "max-tokens", cfg.MaxTokens, "ceiling of a request's max_tokens")
	flag.IntVar(&cfg.QueueSize, "queue", cfg.QueueSize, "requests that may wait for the scheduler")
	flag.IntVar(&cfg.MaxBatch, "max-batch", cfg.MaxBatch, "most requests generated together in one batch, of any adapters")
	flag.DurationVar(&cfg.RequestTimeout, "request-timeout", cfg.RequestTimeout, "longest a request may take, queueing included")
	flag.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", cfg.ShutdownTimeout, "how long a shutdown waits for requests in flight")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *addr, *modelDir, *name, adapters, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}

// run loads the models and serves on addr until ctx is done.
func run(ctx context.Context, addr, modelDir, name string, adapters []adapterSpec, cfg Config) error {
	s, err := load(modelDir, name, adapters, cfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	log.Printf("serve: %s on http://%s", strings.Join(s.eng.models(), ", "), ln.Addr())
	if s.text.builtinTemplate {
		log.Printf("serve: the model has no chat template; chats use a plain one (role: content)")
	}
	err = s.serve(ctx, ln)
	log.Printf("serve: stopped")
	return err
}

// load builds the server for the model folder modelDir (empty: the embedded stories260K), named
// name in requests (empty: stories260K or the folder's name), with adapters.
func load(modelDir, name string, adapters []adapterSpec, cfg Config) (*server, error) {
	fsys, path := stories260k.FS(), stories260k.Name
	if modelDir != "" {
		fsys, path = os.DirFS(modelDir), modelDir
	}
	if name == "" {
		name = filepath.Base(path)
	}
	return loadFS(fsys, name, path, adapters, cfg)
}

// loadFS is load for a model folder fsys at path.
func loadFS(fsys fs.FS, name, path string, adapters []adapterSpec, cfg Config) (*server, error) {
	eng, llamaCfg, err := loadEngine(fsys, name, path, adapters, cfg.MaxBatch)
	if err != nil {
		return nil, err
	}
	text, err := loadText(fsys, path, llamaCfg)
	if err != nil {
		return nil, err
	}
	return newServer(eng, text, cfg)
}
