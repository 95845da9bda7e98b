//go:build ignore

// Generate writes train.jsonl and valid.jsonl: short questions about a child's toy and its
// colour, in the words of TinyStories (so stories260K's tokenizer knows them), answered with
// one sentence. The base model has never seen the question form; after fine-tuning it answers
// with the right colour. Run from the repository root:
//
//	go run examples/train/testdata/generate.go
package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
)

var (
	names   = []string{"Tom", "Lily", "Sue", "Max", "Ben", "Mia", "Tim", "Anna", "Sam", "Lucy"}
	toys    = []string{"ball", "kite", "hat", "box", "car", "boat", "doll", "cup", "bike", "bear"}
	colours = []string{"red", "blue", "green", "yellow", "pink", "brown", "white", "black"}
	places  = []string{"in the park", "at home", "by the tree", "in the garden", "at school", "near the pond"}
)

type record struct {
	Prompt     string `json:"prompt"`
	Completion string `json:"completion"`
}

func main() {
	rng := rand.New(rand.NewPCG(2026, 12))
	write := func(name string, n int) {
		f, err := os.Create(filepath.Join("examples", "train", "testdata", name))
		if err != nil {
			panic(err)
		}
		defer f.Close()
		enc := json.NewEncoder(f)
		for range n {
			who, toy, colour, where := names[rng.IntN(len(names))], toys[rng.IntN(len(toys))], colours[rng.IntN(len(colours))], places[rng.IntN(len(places))]
			prompt := fmt.Sprintf("%s had a %s %s. %s played with it %s. What colour was the %s?", who, colour, toy, who, where, toy)
			completion := fmt.Sprintf(" The %s was %s.", toy, colour)
			if err := enc.Encode(record{prompt, completion}); err != nil {
				panic(err)
			}
		}
	}
	write("train.jsonl", 320)
	write("valid.jsonl", 40)
}
