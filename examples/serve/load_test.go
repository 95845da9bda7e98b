package main

import (
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// stableGoroutines returns the number of goroutines once it stops falling (the connections of a
// server just shut down ending).
func stableGoroutines() int {
	n := runtime.NumGoroutine()
	for range 100 {
		time.Sleep(20 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m >= n {
			return n
		}
		n = m
	}
	return n
}

// settleGoroutines waits (at most 5 s) until no more than n goroutines run, and returns how many
// do.
func settleGoroutines(n int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := runtime.NumGoroutine()
		if got <= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A bounded load: 8 concurrent clients × 4 requests each over the base and two adapters (LoRA
// and prompt tuning), completions and chats, half of them streamed, greedy with max_tokens 8.
// Every answer equals the same request run alone, none fails, and after the shutdown the
// goroutines are back to where they were before the server started.
func TestLoad(t *testing.T) {
	const clients, perClient, maxTokens = 8, 4, 8
	eng, text := fixture(t)
	models := []string{baseName, loraA, promptTune}
	prompts := []string{"Once upon a time", "The little dog", "Tom and Sue went", "One day, a bird"}
	type key struct {
		model, prompt string
		chat, stream  bool
	}
	body := func(k key) (string, map[string]any) {
		if k.chat {
			return "/v1/chat/completions", greedy(k.model, maxTokens, map[string]any{"messages": []map[string]string{{"role": "user", "content": k.prompt}}})
		}
		return "/v1/completions", greedy(k.model, maxTokens, map[string]any{"prompt": k.prompt})
	}
	keyOf := func(client, i int) key {
		n := client*perClient + i
		return key{model: models[n%len(models)], prompt: prompts[(n/len(models))%len(prompts)], chat: n%4 >= 2, stream: n%2 == 1}
	}

	// Each request alone, one at a time, on a first server.
	alone := start(t, eng, text, DefaultConfig())
	want := map[key]string{}
	for c := range clients {
		for i := range perClient {
			k := keyOf(c, i)
			k.stream = false
			if _, done := want[k]; !done {
				path, b := body(k)
				want[k] = alone.complete(t, path, b).text()
			}
		}
	}
	require.NoError(t, alone.stop())
	before := stableGoroutines()

	r := start(t, eng, text, DefaultConfig())
	var mu sync.Mutex
	var latencies []time.Duration
	var failures []string
	began := time.Now()
	var wg sync.WaitGroup
	for c := range clients {
		wg.Go(func() {
			for i := range perClient {
				k := keyOf(c, i)
				path, b := body(k)
				t0 := time.Now()
				var got string
				var err error
				if k.stream {
					got, err = tryStream(r, path, b)
				} else {
					got, err = tryComplete(r, path, b)
				}
				elapsed := time.Since(t0)
				k.stream = false
				mu.Lock()
				latencies = append(latencies, elapsed)
				if err != nil {
					failures = append(failures, err.Error())
				} else if got != want[k] {
					failures = append(failures, fmt.Sprintf("%+v: got %q, alone %q", k, got, want[k]))
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	wall := time.Since(began)
	require.NoError(t, r.stop())
	after := settleGoroutines(before)

	slices.Sort(latencies)
	n := len(latencies)
	p50, p99 := latencies[n/2], latencies[(n*99+99)/100-1]
	t.Logf("load: %d requests, %d concurrent clients, %d models, max_tokens %d: p50 %v, p99 %v, wall %v (%.1f requests/s), errors %d; goroutines %d before, %d after",
		n, clients, len(models), maxTokens, p50.Round(time.Millisecond), p99.Round(time.Millisecond), wall.Round(time.Millisecond),
		float64(n)/wall.Seconds(), len(failures), before, after)
	require.Empty(t, failures)
	require.Equal(t, clients*perClient, n)
	require.LessOrEqual(t, after, before, "goroutines: %d before the server, %d after its shutdown", before, after)
}

// tryComplete is complete returning errors instead of failing (it runs off the test's goroutine).
func tryComplete(r *running, path string, body map[string]any) (string, error) {
	var c completionResponse
	if err := postDecode(r, path, body, &c); err != nil {
		return "", err
	}
	if len(c.Choices) != 1 {
		return "", fmt.Errorf("%d choices", len(c.Choices))
	}
	return c.text(), nil
}
