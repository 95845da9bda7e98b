package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
)

// The server on the embedded stories260K, asked over loopback for a greedy completion as an
// OpenAI client would, then shut down as SIGINT would.
func Example() {
	s, err := load("", "", nil, DefaultConfig()) // add adapters as []adapterSpec{{name, dir}}
	if err != nil {
		fmt.Println(err)
		return
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, shutdown := context.WithCancel(context.Background())
	defer shutdown()
	served := make(chan error, 1)
	go func() { served <- s.serve(ctx, ln) }()

	client := &http.Client{Transport: &http.Transport{}}
	resp, err := client.Post("http://"+ln.Addr().String()+"/v1/completions", "application/json",
		strings.NewReader(`{"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}`))
	if err != nil {
		fmt.Println(err)
		return
	}
	var answer struct {
		Choices []struct {
			Text         string `json:"text"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage usage `json:"usage"`
	}
	err = json.NewDecoder(resp.Body).Decode(&answer)
	resp.Body.Close()
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%q %s %+v\n", answer.Choices[0].Text, answer.Choices[0].FinishReason, answer.Usage)
	client.CloseIdleConnections()
	shutdown()
	fmt.Println("shut down:", <-served)
	// Output:
	// ", there was a little girl named Lily. She loved to play" length {PromptTokens:5 CompletionTokens:16 TotalTokens:21}
	// shut down: <nil>
}
