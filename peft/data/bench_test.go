package data_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/data"
	"peft/peft/pefttest"
)

// BenchmarkPipeline measures the data pipeline (reading examples/train's JSONL, tokenizing,
// building batches) next to the train step it feeds (LoRA on stories260K, batch 4 × 48 tokens),
// in tokens per second, and reports their ratio: above 1 the pipeline keeps up.
//
//	go test -run '^$' -bench Pipeline ./peft/data/
func BenchmarkPipeline(b *testing.B) {
	const batch, seq = 4, 48
	raw, err := os.ReadFile(filepath.Join("..", "..", "examples", "train", "testdata", "train.jsonl"))
	require.NoError(b, err)
	tok := storiesTokenizer(b)
	_, m := pefttest.StoriesModel(b, func() peft.Method { l, _ := lora.New(lora.DefaultConfig()); return l }())
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 1 << 30, LearningRate: 1e-3, Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
	require.NoError(b, err)

	var pipeline, train time.Duration
	var pipelineTokens, trainTokens int
	for b.Loop() {
		t0 := time.Now()
		f, err := data.ParseJSONL("train.jsonl", bytes.NewReader(raw))
		require.NoError(b, err)
		examples, _, err := data.Tokenize(f, tok, data.Options{SeqLen: seq, EOS: tok.EOS()})
		require.NoError(b, err)
		loader := &data.Loader{Examples: examples, Batch: batch, SeqLen: seq, Shuffle: true}
		n := loader.RowsPerEpoch() / batch
		for i := range n {
			loader.BatchAt(i)
		}
		pipeline += time.Since(t0)
		pipelineTokens += n * batch * seq

		stream, err := data.NewStream("train", loader)
		require.NoError(b, err)
		if trainTokens == 0 { // the first step compiles the graph
			_, err = trainer.TrainSteps(stream, 1)
			require.NoError(b, err)
		}
		t1 := time.Now()
		_, err = trainer.TrainSteps(stream, 4)
		require.NoError(b, err)
		train += time.Since(t1)
		trainTokens += 4 * batch * seq
	}
	pipelinePS := float64(pipelineTokens) / pipeline.Seconds()
	trainPS := float64(trainTokens) / train.Seconds()
	b.ReportMetric(pipelinePS, "pipeline_tokens/s")
	b.ReportMetric(trainPS, "train_tokens/s")
	b.ReportMetric(pipelinePS/trainPS, "pipeline/train")
}
