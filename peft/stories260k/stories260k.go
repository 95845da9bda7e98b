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
