package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"peft/peft/chat"
	"peft/peft/generate"
)

// Config bounds what the server accepts and how long it waits. Zero fields are not defaults:
// start from DefaultConfig.
type Config struct {
	// MaxBodyBytes is the largest request body, in bytes (default 1 MiB); larger is 413.
	MaxBodyBytes int64
	// MaxTokens is the ceiling of a request's max_tokens (default 256).
	MaxTokens int
	// DefaultMaxTokens is max_tokens when a request leaves it out (default 16, OpenAI's).
	DefaultMaxTokens int
	// QueueSize is how many requests may wait for the scheduler (default 64); more is 503.
	QueueSize int
	// MaxBatch is the most requests generated together in one batch, of any adapters (default 8).
	MaxBatch int
	// RequestTimeout ends a generation that runs longer, queueing included (default 2 min).
	RequestTimeout time.Duration
	// ReadHeaderTimeout, ReadTimeout and IdleTimeout are http.Server's (defaults 5 s, 30 s,
	// 2 min). WriteTimeout is RequestTimeout plus 10 s, so a stream is never cut short by it.
	ReadHeaderTimeout, ReadTimeout, IdleTimeout time.Duration
	// ShutdownTimeout is how long a shutdown waits for requests in flight (default 1 min) before
	// it closes their connections.
	ShutdownTimeout time.Duration
}

// DefaultConfig returns the defaults documented on Config's fields.
func DefaultConfig() Config {
	return Config{
		MaxBodyBytes: 1 << 20, MaxTokens: 256, DefaultMaxTokens: 16, QueueSize: 64, MaxBatch: 8,
		RequestTimeout: 2 * time.Minute, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second,
		IdleTimeout: 2 * time.Minute, ShutdownTimeout: time.Minute,
	}
}

// Validate names the first field that is out of range.
func (c Config) Validate() error {
	switch {
	case c.MaxBodyBytes <= 0:
		return fmt.Errorf("serve: MaxBodyBytes must be > 0, got %d", c.MaxBodyBytes)
	case c.MaxTokens <= 0:
		return fmt.Errorf("serve: MaxTokens must be > 0, got %d", c.MaxTokens)
	case c.DefaultMaxTokens <= 0 || c.DefaultMaxTokens > c.MaxTokens:
		return fmt.Errorf("serve: DefaultMaxTokens must be in [1, MaxTokens %d], got %d", c.MaxTokens, c.DefaultMaxTokens)
	case c.QueueSize <= 0:
		return fmt.Errorf("serve: QueueSize must be > 0, got %d", c.QueueSize)
	case c.MaxBatch <= 0:
		return fmt.Errorf("serve: MaxBatch must be > 0, got %d", c.MaxBatch)
	}
	for _, d := range []struct {
		name string
		d    time.Duration
	}{{"RequestTimeout", c.RequestTimeout}, {"ReadHeaderTimeout", c.ReadHeaderTimeout}, {"ReadTimeout", c.ReadTimeout},
		{"IdleTimeout", c.IdleTimeout}, {"ShutdownTimeout", c.ShutdownTimeout}} {
		if d.d <= 0 {
			return fmt.Errorf("serve: %s must be > 0, got %v", d.name, d.d)
		}
	}
	return nil
}

// server is the HTTP layer: it parses and checks requests, tokenizes them, queues them on the
// scheduler and writes OpenAI's response shapes.
type server struct {
	cfg     Config
	eng     engine
	text    *textModel
	sched   *scheduler // set by serve
	created int64      // the models' creation time for /v1/models: the server's start
}

// newServer checks cfg and returns a server of eng's models, whose text is text's.
func newServer(eng engine, text *textModel, cfg Config) (*server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &server{cfg: cfg, eng: eng, text: text, created: time.Now().Unix()}, nil
}

// serve answers on ln until ctx is done (SIGINT or SIGTERM in main), then shuts down
// gracefully: the listener closes (new connections are refused), requests in flight finish
// (for at most ShutdownTimeout, then their connections close), and the scheduler stops. It
// returns nil after a clean shutdown.
func (s *server) serve(ctx context.Context, ln net.Listener) error {
	s.sched = newScheduler(s.eng, s.cfg.QueueSize)
	defer s.sched.stop()
	srv := &http.Server{
		Handler:           s.handler(),
		ReadHeaderTimeout: s.cfg.ReadHeaderTimeout,
		ReadTimeout:       s.cfg.ReadTimeout,
		WriteTimeout:      s.cfg.RequestTimeout + 10*time.Second,
		IdleTimeout:       s.cfg.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(shutdownCtx)
	if err != nil {
		err = errors.Join(fmt.Errorf("shutdown: requests still in flight after -shutdown-timeout %v were cut off: %w", s.cfg.ShutdownTimeout, err), srv.Close())
	}
	if serveErr := <-served; !errors.Is(serveErr, http.ErrServerClosed) {
		err = errors.Join(err, serveErr)
	}
	return err
}

// chatRoles are the message roles OpenAI's chat API takes.
var chatRoles = []string{"system", "developer", "user", "assistant", "tool"}

// handler routes the API. Every error, unknown paths and methods included, is OpenAI's JSON
// error shape.
func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	route := func(path, method string, h http.HandlerFunc) {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			if r.Method != method {
				w.Header().Set("Allow", method)
				writeError(w, &apiError{status: http.StatusMethodNotAllowed, code: "method_not_allowed",
					msg: fmt.Sprintf("%s takes %s, not %s", path, method, r.Method)})
				return
			}
			h(w, r)
		})
	}
	route("/v1/completions", http.MethodPost, s.completions)
	route("/v1/chat/completions", http.MethodPost, s.chatCompletions)
	route("/v1/models", http.MethodGet, s.listModels)
	route("/healthz", http.MethodGet, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{status: http.StatusNotFound, code: "not_found",
			msg: fmt.Sprintf("no such endpoint %s; the API is POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /healthz", r.URL.Path)})
	})
	return mux
}

// apiError is an error response: OpenAI's {"error": {"message", "type", "param", "code"}}.
type apiError struct {
	status int
	msg    string
	param  string // the request field at fault, if any
	code   string
}

// body is the error's JSON object.
func (e *apiError) body() map[string]any {
	kind := "invalid_request_error"
	if e.status >= 500 {
		kind = "server_error"
	}
	var param, code any
	if e.param != "" {
		param = e.param
	}
	if e.code != "" {
		code = e.code
	}
	return map[string]any{"error": map[string]any{"message": e.msg, "type": kind, "param": param, "code": code}}
}

// badField is a 400 naming the field.
func badField(field, format string, args ...any) *apiError {
	return &apiError{status: http.StatusBadRequest, param: field, code: "invalid_value", msg: field + ": " + fmt.Sprintf(format, args...)}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.Printf("serve: writing a response: %v", err)
	}
}

func writeError(w http.ResponseWriter, e *apiError) { writeJSON(w, e.status, e.body()) }

// modelEntry is one model of GET /v1/models.
type modelEntry struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// Parent is the base model an adapter applies to (empty for the base), as vLLM lists it.
	Parent string `json:"parent,omitempty"`
}

func (s *server) listModels(w http.ResponseWriter, r *http.Request) {
	names := s.eng.models()
	data := make([]modelEntry, len(names))
	for i, name := range names {
		data[i] = modelEntry{ID: name, Object: "model", Created: s.created, OwnedBy: "peft"}
		if i > 0 {
			data[i].Parent = names[0]
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

// options are the fields that completions and chat completions share.
type options struct {
	Model               string          `json:"model"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	Seed                *int64          `json:"seed"`
	Stop                json.RawMessage `json:"stop"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	N *int `json:"n"`
}

type completionRequest struct {
	options
	Prompt *string `json:"prompt"`
}

type chatRequest struct {
	options
	Messages []chat.Message `json:"messages"`
}

// decode reads the JSON body into v: 413 when it is larger than MaxBodyBytes, 400 naming the
// field of a wrong type.
func (s *server) decode(w http.ResponseWriter, r *http.Request, v any) *apiError {
	r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
	dec := json.NewDecoder(r.Body)
	err := dec.Decode(v)
	if err == nil && dec.More() {
		err = errors.New("more than one JSON value")
	}
	var tooLarge *http.MaxBytesError
	var typeErr *json.UnmarshalTypeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &tooLarge):
		return &apiError{status: http.StatusRequestEntityTooLarge, code: "request_too_large",
			msg: fmt.Sprintf("the request body is larger than %d bytes", tooLarge.Limit)}
	case errors.As(err, &typeErr) && typeErr.Field != "":
		// Fields of the embedded options are named as the client wrote them.
		return badField(strings.TrimPrefix(typeErr.Field, "options."), "must be a JSON %s, not %s", jsonKind(typeErr.Type.Kind().String()), typeErr.Value)
	default:
		return &apiError{status: http.StatusBadRequest, code: "invalid_json", msg: "the body is not a JSON request: " + err.Error()}
	}
}

// jsonKind names a Go kind in JSON's words.
func jsonKind(kind string) string {
	switch {
	case kind == "ptr" || kind == "string":
		return "string"
	case strings.HasPrefix(kind, "int") || strings.HasPrefix(kind, "uint") || strings.HasPrefix(kind, "float"):
		return "number"
	case kind == "slice":
		return "array"
	case kind == "struct" || kind == "map":
		return "object"
	}
	return kind
}

// generation is a checked request, ready for the scheduler.
type generation struct {
	req           request
	stops         []string
	stream, usage bool
}

// check validates the shared options for a prompt of ids, picks the model (404 naming the known
// ones) and builds the request with the given stop ids.
func (s *server) check(o options, ids []int, stopIDs []int, promptField string) (*generation, *apiError) {
	names := s.eng.models()
	if o.Model == "" {
		return nil, badField("model", "is required; one of %s", strings.Join(names, ", "))
	}
	if !slices.Contains(names, o.Model) {
		return nil, &apiError{status: http.StatusNotFound, param: "model", code: "model_not_found",
			msg: fmt.Sprintf("model %q is not served; the models are %s", o.Model, strings.Join(names, ", "))}
	}
	if o.N != nil && *o.N != 1 {
		return nil, badField("n", "only 1 is supported, got %d", *o.N)
	}
	g := &generation{stream: o.Stream, usage: o.StreamOptions != nil && o.StreamOptions.IncludeUsage}
	cfg := generate.Config{MaxNewTokens: s.cfg.DefaultMaxTokens, Temperature: 1, StopIDs: stopIDs}
	field, maxTokens := "max_tokens", o.MaxTokens
	if o.MaxCompletionTokens != nil {
		field, maxTokens = "max_completion_tokens", o.MaxCompletionTokens
	}
	if maxTokens != nil {
		if *maxTokens < 1 || *maxTokens > s.cfg.MaxTokens {
			return nil, badField(field, "must be in [1, %d], got %d", s.cfg.MaxTokens, *maxTokens)
		}
		cfg.MaxNewTokens = *maxTokens
	}
	if o.Temperature != nil {
		if t := *o.Temperature; !(t >= 0 && t <= 2) {
			return nil, badField("temperature", "must be in [0, 2] (0: greedy), got %g", t)
		}
		cfg.Temperature = *o.Temperature
	}
	if o.TopP != nil {
		if p := *o.TopP; !(p > 0 && p <= 1) {
			return nil, badField("top_p", "must be in (0, 1], got %g", p)
		}
		cfg.TopP = *o.TopP
	}
	if o.Seed != nil {
		cfg.Seed = uint64(*o.Seed)
	} else {
		var b [8]byte
		_, _ = rand.Read(b[:])
		cfg.Seed = binary.LittleEndian.Uint64(b[:])
	}
	stops, err := parseStop(o.Stop)
	if err != nil {
		return nil, badField("stop", "%v", err)
	}
	g.stops = stops
	if limit := s.eng.maxLength(o.Model); limit > 0 {
		if len(ids) >= limit {
			return nil, &apiError{status: http.StatusBadRequest, param: promptField, code: "context_length_exceeded",
				msg: fmt.Sprintf("%s: the prompt has %d tokens; model %s takes at most %d tokens, prompt and completion", promptField, len(ids), o.Model, limit)}
		}
		if len(ids)+cfg.MaxNewTokens > limit {
			return nil, &apiError{status: http.StatusBadRequest, param: field, code: "context_length_exceeded",
				msg: fmt.Sprintf("%s: the prompt's %d tokens and %s %d are %d, more than the %d tokens model %s takes; ask for at most %d",
					field, len(ids), field, cfg.MaxNewTokens, len(ids)+cfg.MaxNewTokens, limit, o.Model, limit-len(ids))}
		}
	}
	if err := cfg.Validate(); err != nil {
		return nil, &apiError{status: http.StatusBadRequest, msg: err.Error()}
	}
	g.req = request{model: o.Model, prompt: ids, cfg: cfg}
	return g, nil
}

// parseStop reads stop: absent, null, a string or a list of at most 4 non-empty strings.
func parseStop(raw json.RawMessage) ([]string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var one string
	if err := json.Unmarshal(raw, &one); err == nil {
		raw = json.RawMessage(`[` + string(raw) + `]`)
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, errors.New("must be a string or a list of strings")
	}
	if len(list) > 4 {
		return nil, fmt.Errorf("at most 4 stop strings, got %d", len(list))
	}
	for i, s := range list {
		if s == "" {
			return nil, fmt.Errorf("stop string %d is empty", i)
		}
	}
	return list, nil
}

func (s *server) completions(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	s.handle(w, r, &req, &req.options, completionShape{}, func() ([]int, *apiError) {
		if req.Prompt == nil {
			return nil, badField("prompt", "is required (a string)")
		}
		ids, err := s.text.encode(*req.Prompt)
		if err != nil {
			return nil, badField("prompt", "%v", err)
		}
		return ids, nil
	})
}

func (s *server) chatCompletions(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	s.handle(w, r, &req, &req.options, chatShape{}, func() ([]int, *apiError) {
		if len(req.Messages) == 0 {
			return nil, badField("messages", "is required (a list of {role, content})")
		}
		for i, m := range req.Messages {
			if !slices.Contains(chatRoles, m.Role) {
				return nil, badField(fmt.Sprintf("messages[%d].role", i), "must be one of %s, got %q", strings.Join(chatRoles, ", "), m.Role)
			}
		}
		ids, err := s.text.encodeChat(req.Messages)
		if err != nil {
			return nil, badField("messages", "%v", err)
		}
		return ids, nil
	})
}

// handle answers one request of an endpoint: it decodes the body into req (whose shared fields
// are o), tokenizes it with prompt, checks the options and responds in sh's shapes.
func (s *server) handle(w http.ResponseWriter, r *http.Request, req any, o *options, sh shape, prompt func() ([]int, *apiError)) {
	if e := s.decode(w, r, req); e != nil {
		writeError(w, e)
		return
	}
	ids, e := prompt()
	if e != nil {
		writeError(w, e)
		return
	}
	stopIDs, field := s.text.stopIDs, "prompt"
	if _, isChat := sh.(chatShape); isChat {
		stopIDs, field = s.text.chatStopIDs, "messages"
	}
	g, e := s.check(*o, ids, stopIDs, field)
	if e != nil {
		writeError(w, e)
		return
	}
	s.respond(w, r, g, sh)
}

// shape writes the JSON objects of one endpoint: the response, and a stream's chunks.
type shape interface {
	prefix() string
	// response is the whole answer's object.
	response(id string, created int64, model, text, reason string, usage usage) any
	// chunk is a stream's object for text (with the role if role, in a chat); reason is nil
	// until the last.
	chunk(id string, created int64, model, text string, role bool, reason *string) chunkObject
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// respond queues g (503 when the queue is full) and writes its answer, as one JSON object or
// as server-sent events flushed per delta.
func (s *server) respond(w http.ResponseWriter, r *http.Request, g *generation, sh shape) {
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.RequestTimeout)
	defer cancel()
	g.req.ctx = ctx
	j := newJob(g.req, s.text, g.stops)
	if !s.sched.submit(j) {
		w.Header().Set("Retry-After", "1")
		writeError(w, &apiError{status: http.StatusServiceUnavailable, code: "queue_full",
			msg: fmt.Sprintf("the server is busy: %d requests are waiting; retry later", s.cfg.QueueSize)})
		return
	}
	id, created, model := sh.prefix()+newID(), time.Now().Unix(), g.req.model
	if !g.stream {
		j.wait()
		if j.err != nil {
			writeError(w, generationError(j.err))
			return
		}
		writeJSON(w, http.StatusOK, sh.response(id, created, model, j.result, j.reason, j.usage()))
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	event := func(v any) {
		data, err := json.Marshal(v)
		if err != nil {
			panic(err) // our own types: a programmer bug
		}
		// A failed write means the client went away, which cancels ctx and so the generation.
		if _, err := fmt.Fprintf(w, "data: %s\n\n", data); err == nil {
			_ = rc.Flush()
		}
	}
	if _, isChat := sh.(chatShape); isChat { // OpenAI's first chat chunk gives the role
		event(sh.chunk(id, created, model, "", true, nil))
	}
	for delta := range j.deltas {
		event(sh.chunk(id, created, model, delta, false, nil))
	}
	if j.err != nil {
		event(generationError(j.err).body())
	} else {
		event(sh.chunk(id, created, model, "", false, &j.reason))
		if g.usage { // stream_options.include_usage: a last chunk with no choices
			u := j.usage()
			c := sh.chunk(id, created, model, "", false, nil)
			c.Choices, c.Usage = []any{}, &u
			event(c)
		}
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	_ = rc.Flush()
}

// usage counts a finished job's tokens.
func (j *job) usage() usage {
	return usage{PromptTokens: len(j.req.prompt), CompletionTokens: len(j.ids), TotalTokens: len(j.req.prompt) + len(j.ids)}
}

// generationError is the response for a generation that failed.
func generationError(err error) *apiError {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return &apiError{status: http.StatusGatewayTimeout, code: "timeout", msg: "the generation ran past the request timeout"}
	case errors.Is(err, context.Canceled):
		return &apiError{status: 499, code: "canceled", msg: "the request was canceled"}
	case errors.Is(err, errShuttingDown):
		return &apiError{status: http.StatusServiceUnavailable, code: "shutting_down", msg: err.Error()}
	}
	return &apiError{status: http.StatusInternalServerError, code: "generation_failed", msg: err.Error()}
}

// newID is 12 random bytes in hex, for response ids.
func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// completionShape is POST /v1/completions's.
type completionShape struct{}

type completionChoice struct {
	Index        int     `json:"index"`
	Text         string  `json:"text"`
	Logprobs     any     `json:"logprobs"`
	FinishReason *string `json:"finish_reason"`
}

// chunkObject is a stream chunk.
type chunkObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []any  `json:"choices"`
	Usage   *usage `json:"usage,omitempty"`
}

func (completionShape) prefix() string { return "cmpl-" }

func (completionShape) response(id string, created int64, model, text, reason string, u usage) any {
	return map[string]any{
		"id": id, "object": "text_completion", "created": created, "model": model,
		"choices": []completionChoice{{Index: 0, Text: text, FinishReason: &reason}}, "usage": u,
	}
}

func (completionShape) chunk(id string, created int64, model, text string, _ bool, reason *string) chunkObject {
	return chunkObject{ID: id, Object: "text_completion", Created: created, Model: model,
		Choices: []any{completionChoice{Index: 0, Text: text, FinishReason: reason}}}
}

// chatShape is POST /v1/chat/completions's.
type chatShape struct{}

type chatDelta struct {
	Role    string `json:"role,omitempty"`
	Content string `json:"content,omitempty"`
}

func (chatShape) prefix() string { return "chatcmpl-" }

func (chatShape) response(id string, created int64, model, text, reason string, u usage) any {
	return map[string]any{
		"id": id, "object": "chat.completion", "created": created, "model": model,
		"choices": []map[string]any{{"index": 0, "message": chat.Message{Role: "assistant", Content: text}, "finish_reason": reason}},
		"usage":   u,
	}
}

func (chatShape) chunk(id string, created int64, model, text string, role bool, reason *string) chunkObject {
	delta := chatDelta{Content: text}
	if role {
		delta.Role = "assistant"
	}
	return chunkObject{ID: id, Object: "chat.completion.chunk", Created: created, Model: model,
		Choices: []any{map[string]any{"index": 0, "delta": delta, "finish_reason": reason}}}
}
