package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// goldenIDs are the first ids of the base model's greedy continuation of "Once upon a time":
// ", there was a little g" (the start of "girl").
var goldenIDs = []int{432, 383, 286, 261, 376, 298}

// fakeEngine emits goldenIDs for every row, holding every call after the first id until hold
// is closed (when hold is not nil) or the first row's request ends, and reports the models of
// each call on calls and its rows' errors on errs: a stand-in for a batched engine, and a way to
// keep a request in flight.
type fakeEngine struct {
	batch int
	hold  chan struct{}
	calls chan []string
	errs  chan []error
}

func newFakeEngine(batch int, hold bool) *fakeEngine {
	f := &fakeEngine{batch: batch, calls: make(chan []string, 16), errs: make(chan []error, 16)}
	if hold {
		f.hold = make(chan struct{})
	}
	return f
}

func (f *fakeEngine) models() []string { return []string{baseName, loraA, loraB, promptTune} }

func (f *fakeEngine) maxLength(string) int { return 512 }

func (f *fakeEngine) maxBatch() int { return f.batch }

func (f *fakeEngine) generate(reqs []request, emit func(row, id int) bool) []error {
	models := make([]string, len(reqs))
	for i, r := range reqs {
		models[i] = r.model
	}
	f.calls <- models
	errs := make([]error, len(reqs))
	ended := make([]bool, len(reqs))
	for step, id := range goldenIDs {
		if step == 1 && f.hold != nil {
			select {
			case <-f.hold:
			case <-reqs[0].ctx.Done():
			}
		}
		for row, r := range reqs {
			if ended[row] {
				continue
			}
			if err := r.ctx.Err(); err != nil {
				errs[row], ended[row] = err, true
				continue
			}
			ended[row] = !emit(row, id) || step+1 == r.cfg.MaxNewTokens
		}
	}
	f.errs <- errs
	return errs
}

// fakeText is the text of goldenIDs after "Once upon a time".
const fakeText = ", there was a little g"

// postAsync posts a greedy completion of model in the background and sends its status and text.
func (r *running) postAsync(t *testing.T, model string) <-chan completionResponse {
	out := make(chan completionResponse, 1)
	go func() {
		var c completionResponse
		resp, err := r.client.Post(r.url+"/v1/completions", "application/json",
			bytes.NewReader(encode(t, greedy(model, 16, map[string]any{"prompt": storyPrompt}))))
		if err == nil {
			defer resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				err = json.NewDecoder(resp.Body).Decode(&c)
			} else {
				c.Object = resp.Status
			}
		}
		if err != nil {
			c.Object = err.Error()
		}
		out <- c
	}()
	return out
}

// waitQueued waits until n jobs wait in the scheduler's queue.
func waitQueued(t *testing.T, r *running, n int) {
	t.Helper()
	require.Eventually(t, func() bool { return len(r.srv.sched.queue) == n }, 10*time.Second, time.Millisecond)
}

// With one request running and the queue full, the next one is refused with 503 at once; the
// others are answered when the engine goes on.
func TestQueueFull(t *testing.T) {
	_, text := fixture(t)
	eng := newFakeEngine(1, true)
	cfg := DefaultConfig()
	cfg.QueueSize = 1
	r := start(t, eng, text, cfg)
	running := r.postAsync(t, loraA)
	require.Equal(t, []string{loraA}, <-eng.calls)
	queued := r.postAsync(t, loraB)
	waitQueued(t, r, 1)

	resp, err := r.client.Post(r.url+"/v1/completions", "application/json", bytes.NewReader(encode(t, greedy(baseName, 4, map[string]any{"prompt": storyPrompt}))))
	require.NoError(t, err)
	data, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	require.Equal(t, "1", resp.Header.Get("Retry-After"))
	var e apiErrorBody
	require.NoError(t, json.Unmarshal(data, &e))
	require.Equal(t, "server_error", e.Error.Type)
	require.Equal(t, "queue_full", *e.Error.Code)
	require.Contains(t, e.Error.Message, "1 requests are waiting")

	close(eng.hold)
	for _, c := range []completionResponse{<-running, <-queued} {
		require.Equal(t, "text_completion", c.Object)
		require.Equal(t, fakeText, c.text())
	}
	require.Equal(t, []string{loraB}, <-eng.calls)
}

// Requests for different adapters that wait together run in one call of an engine that takes
// batches, each answered with its own row.
func TestSchedulerBatchesAdapters(t *testing.T) {
	_, text := fixture(t)
	eng := newFakeEngine(4, true)
	r := start(t, eng, text, DefaultConfig())
	first := r.postAsync(t, baseName)
	require.Equal(t, []string{baseName}, <-eng.calls)
	var waiting []<-chan completionResponse
	for _, model := range []string{loraA, loraB, promptTune} {
		waiting = append(waiting, r.postAsync(t, model))
	}
	waitQueued(t, r, 3)
	close(eng.hold)
	require.Equal(t, baseName, (<-first).Model)
	batch := <-eng.calls
	slices.Sort(batch)
	require.Equal(t, []string{loraA, loraB, promptTune}, batch, "one call for the three queued requests")
	for i, w := range waiting {
		c := <-w
		require.Equal(t, []string{loraA, loraB, promptTune}[i], c.Model)
		require.Equal(t, fakeText, c.text())
	}
}

// A generation that runs past RequestTimeout is a 504 in OpenAI's error shape.
func TestRequestTimeout(t *testing.T) {
	_, text := fixture(t)
	eng := newFakeEngine(1, true) // never released
	cfg := DefaultConfig()
	cfg.RequestTimeout = 100 * time.Millisecond
	r := start(t, eng, text, cfg)
	status, data := r.post(t, "/v1/completions", greedy(loraA, 8, map[string]any{"prompt": storyPrompt}))
	require.Equal(t, http.StatusGatewayTimeout, status, "%s", data)
	var e apiErrorBody
	require.NoError(t, json.Unmarshal(data, &e))
	require.Equal(t, "timeout", *e.Error.Code)
}

// A client that goes away mid-stream ends its generation: the engine's next emit sees the
// request's context canceled, and the scheduler goes on to the next request.
func TestClientGoneEndsGeneration(t *testing.T) {
	_, text := fixture(t)
	eng := newFakeEngine(1, true)
	r := start(t, eng, text, DefaultConfig())
	resp, err := r.client.Post(r.url+"/v1/completions", "application/json",
		bytes.NewReader(encode(t, greedy(loraA, 16, map[string]any{"prompt": storyPrompt, "stream": true}))))
	require.NoError(t, err)
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	require.NoError(t, err)
	require.Contains(t, line, `"text":","`)
	require.NoError(t, resp.Body.Close()) // the client hangs up
	<-eng.calls
	select {
	case errs := <-eng.errs:
		require.ErrorIs(t, errs[0], context.Canceled)
	case <-time.After(10 * time.Second):
		t.Fatal("the generation went on after the client left")
	}
	close(eng.hold)
	require.Equal(t, fakeText, r.complete(t, "/v1/completions", greedy(loraB, 16, map[string]any{"prompt": storyPrompt})).text())
}

// Shutdown (what SIGINT and SIGTERM trigger) refuses new connections while a request is in
// flight, lets that request finish (its stream complete), then returns nil.
func TestGracefulShutdown(t *testing.T) {
	_, text := fixture(t)
	eng := newFakeEngine(1, true)
	r := start(t, eng, text, DefaultConfig())
	resp, err := r.client.Post(r.url+"/v1/completions", "application/json",
		bytes.NewReader(encode(t, greedy(loraA, 16, map[string]any{"prompt": storyPrompt, "stream": true}))))
	require.NoError(t, err)
	defer resp.Body.Close()
	reader := bufio.NewReader(resp.Body)
	line, err := reader.ReadString('\n')
	require.NoError(t, err)
	require.Contains(t, line, `"text":","`, "the first token's chunk arrives before the engine is released")
	line, err = reader.ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "\n", line, "the end of the first event")

	var wg sync.WaitGroup
	var stopErr error
	wg.Go(func() { stopErr = r.stop() })
	fresh := &http.Client{Transport: &http.Transport{}, Timeout: 5 * time.Second}
	require.Eventually(t, func() bool {
		resp, err := fresh.Get(r.url + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err != nil && strings.Contains(err.Error(), "refused")
	}, 10*time.Second, 5*time.Millisecond, "new connections are refused during the shutdown")

	close(eng.hold)
	events := readEvents(t, reader)
	require.Equal(t, "[DONE]", events[len(events)-1])
	var chunks []completionResponse
	for _, e := range events[:len(events)-1] {
		var c completionResponse
		require.NoError(t, json.Unmarshal([]byte(e), &c))
		chunks = append(chunks, c)
	}
	rest, reason := streamedText(t, chunks)
	require.Equal(t, fakeText, ","+rest)
	require.Equal(t, "length", reason)
	wg.Wait()
	require.NoError(t, stopErr)
}

// A job holds back the tail of the text that may begin a stop string or that ends inside a
// character, and never sends more than the final text.
func TestStopPrefix(t *testing.T) {
	cases := []struct {
		text  string
		stops []string
		want  int
	}{
		{"once upon", nil, 0},
		{"once upon", []string{"xyz"}, 0},
		{"once upon", []string{"nowhere"}, 1}, // the "n" may begin "nowhere"
		{"once upon a ti", []string{"time"}, 2},
		{"once upon a ti", []string{"a time", "time"}, 4},
		{"abc", []string{"c"}, 0}, // a whole stop string is found, not held back
		{"ab", []string{"abcd"}, 2},
	}
	for _, tc := range cases {
		require.Equal(t, tc.want, stopPrefix(tc.text, tc.stops), "%q %q", tc.text, tc.stops)
	}
}
