// Package stories260k embeds a real pretrained model: Andrej Karpathy's stories260K, a
// Llama-architecture model of 260K parameters trained on TinyStories (MIT license), in Hugging
// Face format (config.json, model.safetensors, tokenizer.json), with reference outputs
// (golden.json) computed by an independent implementation. See testdata/stories260K/README.md
// for its provenance and testdata/stories260K/LICENSE for its license.
//
// It is the SDK's default model: examples and tests load it without downloading anything.
package stories260k

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
)

//go:embed testdata/stories260K
var files embed.FS

// FS returns the model folder: config.json, model.safetensors, tokenizer.json,
// tokenizer_config.json, golden.json, LICENSE and README.md.
func FS() fs.FS {
	sub, err := fs.Sub(files, "testdata/stories260K")
	if err != nil {
		panic(err) // the embedded folder is part of the build: a programmer bug
	}
	return sub
}

// Name is how the model is referred to in messages and saved configurations.
const Name = "stories260K"

// GoldenSequence returns golden.json's greedy sequence: <s> followed by the 64 ids an independent
// implementation decoded greedily from it. Tests score it (its mean next-token loss under the
// float32 model is golden.json's 0.39728868731037015) or fine-tune on it.
func GoldenSequence() ([]int, error) {
	data, err := fs.ReadFile(FS(), "golden.json")
	if err != nil {
		return nil, err
	}
	var g struct {
		Greedy struct {
			StartIDs     []int `json:"start_ids"`
			GeneratedIDs []int `json:"generated_ids"`
		} `json:"greedy"`
	}
	if err := json.Unmarshal(data, &g); err != nil {
		return nil, fmt.Errorf("stories260k: golden.json: %w", err)
	}
	return append(append([]int{}, g.Greedy.StartIDs...), g.Greedy.GeneratedIDs...), nil
}
