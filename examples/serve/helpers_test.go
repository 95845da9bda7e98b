package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	gomlxcontext "github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/pefttest"
	"peft/peft/stories260k"
	"peft/prompttuning"
)

// The served names of the test fixture: the base and three adapters, each giving its own greedy
// text.
const (
	baseName   = stories260k.Name
	loraA      = "lora-a"
	loraB      = "lora-b"
	promptTune = "prompt"
)

// fixtureDir holds the adapters the tests save; TestMain removes it.
var fixtureDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "serve-test")
	if err != nil {
		panic(err)
	}
	fixtureDir = dir
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

var (
	fixtureOnce sync.Once
	fixtureSrv  *server // its engine and text model; each test makes its own server of them
)

// fixture loads the embedded stories260K with two random LoRAs (B drawn with seeds 1 and 2) and a
// prompt tuning of 20 random virtual tokens (N(0, 3²)), saved as adapter folders and loaded
// back by the server's own loader (once per test binary).
func fixture(t *testing.T) (*batchEngine, *textModel) {
	t.Helper()
	fixtureOnce.Do(func() {
		var specs []adapterSpec
		for i, name := range []string{loraA, loraB} {
			method, err := lora.New(lora.DefaultConfig())
			require.NoError(t, err)
			_, m := pefttest.StoriesModel(t, method)
			pefttest.SetRandomB(t, m, uint64(i+1), 0.2)
			specs = append(specs, saveAdapter(t, name, m))
		}
		method, err := prompttuning.New(prompttuning.Config{NumVirtualTokens: 20, Init: prompttuning.InitRandom, Seed: 3})
		require.NoError(t, err)
		_, m := pefttest.StoriesModel(t, method)
		// Drawn at the embeddings' scale, not the initialization's, so that the virtual tokens
		// steer the model away from its story start.
		for _, v := range peft.VariablesOf(m.TrainableVariables()) {
			require.NoError(t, peft.SetFloat32s(v, peft.Normal(peft.NewRand(3), v.Shape().Size(), 3)))
		}
		specs = append(specs, saveAdapter(t, promptTune, m))
		fixtureSrv, err = load("", "", specs, DefaultConfig())
		require.NoError(t, err)
	})
	require.NotNil(t, fixtureSrv, "the fixture failed to load in an earlier test")
	return fixtureSrv.eng.(*batchEngine), fixtureSrv.text
}

var (
	aloneMu sync.Mutex
	alone   = map[string]*peft.Model{}
)

// aloneModel is the served name's model built independently of the server: the embedded
// stories260K alone, or with the adapter folder applied by methods.Apply (one model per name,
// built once): what a served request must agree with.
func aloneModel(t *testing.T, name string) *peft.Model {
	t.Helper()
	aloneMu.Lock()
	defer aloneMu.Unlock()
	if m := alone[name]; m != nil {
		return m
	}
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := gomlxcontext.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	require.NoError(t, err)
	peft.NameBaseModel(ctx, stories260k.Name)
	example := shapes.Make(dtypes.Int32, 1, 1)
	var m *peft.Model
	if name == baseName {
		m, err = peft.NewModel(b, ctx, llama.CausalLM(cfg), nil, example)
	} else {
		m, err = methods.Apply(b, ctx, llama.CausalLM(cfg), filepath.Join(fixtureDir, name), []shapes.Shape{example})
	}
	require.NoError(t, err)
	alone[name] = m
	return m
}

func saveAdapter(t *testing.T, name string, m *peft.Model) adapterSpec {
	t.Helper()
	dir := filepath.Join(fixtureDir, name)
	require.NoError(t, m.Save(dir))
	return adapterSpec{name: name, dir: dir}
}

// running is a server answering on loopback.
type running struct {
	srv    *server
	url    string
	client *http.Client
	stop   func() error // shuts the server down (once) and returns serve's error
}

// start serves eng and text with cfg on 127.0.0.1:0 until the test ends or stop is called.
func start(t *testing.T, eng engine, text *textModel, cfg Config) *running {
	t.Helper()
	s, err := newServer(eng, text, cfg)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.serve(ctx, ln) }()
	client := &http.Client{Transport: &http.Transport{}, Timeout: 60 * time.Second}
	var once sync.Once
	var serveErr error
	r := &running{srv: s, url: "http://" + ln.Addr().String(), client: client, stop: func() error {
		once.Do(func() {
			cancel()
			serveErr = <-served
			client.CloseIdleConnections()
		})
		return serveErr
	}}
	t.Cleanup(func() { require.NoError(t, r.stop()) })
	return r
}

// post sends body (JSON-encoded unless it is a string) to path and returns the status and the
// response body.
func (r *running) post(t *testing.T, path string, body any) (int, []byte) {
	t.Helper()
	resp, err := r.client.Post(r.url+path, "application/json", bytes.NewReader(encode(t, body)))
	require.NoError(t, err)
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, data
}

func encode(t *testing.T, body any) []byte {
	t.Helper()
	if s, ok := body.(string); ok {
		return []byte(s)
	}
	data, err := json.Marshal(body)
	require.NoError(t, err)
	return data
}

// completionResponse is the union of OpenAI's completion and chat completion objects, and of
// their stream chunks.
type completionResponse struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []struct {
		Index   int    `json:"index"`
		Text    string `json:"text"`
		Message *struct {
			Role    string `json:"role"`
			Content string `json:"content"`
		} `json:"message"`
		Delta *struct {
			Role    string `json:"role"`
			Content string `json:"content"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *usage `json:"usage"`
}

// text is the first choice's text or message content.
func (c completionResponse) text() string {
	if m := c.Choices[0].Message; m != nil {
		return m.Content
	}
	return c.Choices[0].Text
}

// complete posts a non-streamed request and decodes its 200 answer.
func (r *running) complete(t *testing.T, path string, body map[string]any) completionResponse {
	t.Helper()
	status, data := r.post(t, path, body)
	require.Equal(t, http.StatusOK, status, "%s", data)
	var c completionResponse
	require.NoError(t, json.Unmarshal(data, &c), "%s", data)
	require.Len(t, c.Choices, 1)
	require.NotNil(t, c.Choices[0].FinishReason)
	return c
}

// stream posts body with "stream": true and returns the decoded chunks (the [DONE] event
// checked as the last and dropped).
func (r *running) stream(t *testing.T, path string, body map[string]any) []completionResponse {
	t.Helper()
	streamed := map[string]any{"stream": true}
	for k, v := range body {
		streamed[k] = v
	}
	resp, err := r.client.Post(r.url+path, "application/json", bytes.NewReader(encode(t, streamed)))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	events := readEvents(t, resp.Body)
	require.NotEmpty(t, events)
	require.Equal(t, "[DONE]", events[len(events)-1], "the last event")
	chunks := make([]completionResponse, len(events)-1)
	for i, e := range events[:len(events)-1] {
		require.NoError(t, json.Unmarshal([]byte(e), &chunks[i]), "event %d: %s", i, e)
	}
	return chunks
}

// readEvents reads server-sent events "data: X\n\n" up to the end of body, returning each X.
func readEvents(t *testing.T, body io.Reader) []string {
	t.Helper()
	events, err := parseEvents(body)
	require.NoError(t, err)
	return events
}

// parseEvents is readEvents returning the error of a malformed stream.
func parseEvents(body io.Reader) ([]string, error) {
	var events []string
	sc := bufio.NewScanner(body)
	blank := true
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			if blank {
				return nil, errors.New("an empty event")
			}
			blank = true
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok || !blank {
			return nil, fmt.Errorf("not one data line per event: %q", line)
		}
		events = append(events, data)
		blank = false
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if !blank {
		return nil, errors.New("the stream ends inside an event")
	}
	return events, nil
}

// postDecode posts body and decodes a 200 answer into v, off the test's goroutine.
func postDecode(r *running, path string, body map[string]any, v any) error {
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	resp, err := r.client.Post(r.url+path, "application/json", bytes.NewReader(data))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err = io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", resp.Status, data)
	}
	return json.Unmarshal(data, v)
}

// tryStream streams body and returns the concatenated text, off the test's goroutine.
func tryStream(r *running, path string, body map[string]any) (string, error) {
	streamed := map[string]any{"stream": true}
	for k, v := range body {
		streamed[k] = v
	}
	data, err := json.Marshal(streamed)
	if err != nil {
		return "", err
	}
	resp, err := r.client.Post(r.url+path, "application/json", bytes.NewReader(data))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", errors.New(resp.Status)
	}
	events, err := parseEvents(resp.Body)
	if err != nil {
		return "", err
	}
	if len(events) < 2 || events[len(events)-1] != "[DONE]" {
		return "", fmt.Errorf("the stream does not end with a chunk and [DONE]: %q", events)
	}
	var text strings.Builder
	for _, e := range events[:len(events)-1] {
		var c completionResponse
		if err := json.Unmarshal([]byte(e), &c); err != nil || len(c.Choices) != 1 {
			return "", fmt.Errorf("bad chunk %s", e)
		}
		if d := c.Choices[0].Delta; d != nil {
			text.WriteString(d.Content)
		} else {
			text.WriteString(c.Choices[0].Text)
		}
	}
	return text.String(), nil
}

// streamedText concatenates the chunks' text and returns it with the last chunk's finish
// reason, checking that every chunk but the last (and an usage chunk) has none.
func streamedText(t *testing.T, chunks []completionResponse) (string, string) {
	t.Helper()
	var text strings.Builder
	reason := ""
	for i, c := range chunks {
		if len(c.Choices) == 0 { // stream_options.include_usage's last chunk
			require.NotNil(t, c.Usage)
			continue
		}
		require.Empty(t, reason, "chunk %d after the one with a finish reason", i)
		if d := c.Choices[0].Delta; d != nil {
			text.WriteString(d.Content)
		} else {
			text.WriteString(c.Choices[0].Text)
		}
		if f := c.Choices[0].FinishReason; f != nil {
			reason = *f
		}
	}
	require.NotEmpty(t, reason, "no chunk has a finish reason")
	return text.String(), reason
}

// apiErrorBody is OpenAI's error shape.
type apiErrorBody struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}
