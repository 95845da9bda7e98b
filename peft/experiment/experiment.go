// Package experiment runs the comparison the SDK is about: one pretrained model, one task, every
// fine-tuning method, measured the same way. The sentiment example and the benchmarks both use
// it, so what the README's table shows is what the example prints.
package experiment

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/llama"
	"peft/peft/reviews"
)

// Setup is the model and data every method is compared on.
type Setup struct {
	Backend backends.Backend
	Config  llama.Config
	// Batch and SeqLen of the classification batches.
	Batch, SeqLen int
	// Train and Eval are the classification batches.
	Train, Eval []peft.Batch
	// Pretrained holds the base model's weights after next-token pretraining on review text.
	Pretrained *context.Context
	// PretrainLosses is the next-token loss of each pretraining step.
	PretrainLosses []float64
}

// Options sizes a Setup.
type Options struct {
	Config                    llama.Config
	Batch, SeqLen             int
	TrainReviews, EvalReviews int
	PretrainSteps             int
	Seed                      uint64
	Progress                  peft.Progress
	Output                    io.Writer
}

// DefaultOptions is a small model that pretrains and fine-tunes in seconds on 2 cores.
func DefaultOptions() Options {
	tok := reviews.NewTokenizer()
	return Options{
		Config: llama.Config{VocabSize: tok.VocabSize(), HiddenSize: 64, IntermediateSize: 128, NumLayers: 2,
			NumHeads: 4, NumKVHeads: 2, MaxPositions: 64, RMSNormEps: 1e-5, RopeTheta: 10000, TieEmbeddings: true},
		Batch: 32, SeqLen: reviews.MaxWords + 1, TrainReviews: 2048, EvalReviews: 512,
		PretrainSteps: 150, Seed: 1, Progress: peft.ProgressOff, Output: io.Discard,
	}
}

// NewSetup generates the data and pretrains the base model with next-token loss on the training
// reviews' text (full fine-tuning from random initialization), so that methods which freeze the
// base start from a model that has read reviews before.
func NewSetup(backend backends.Backend, opts Options, pretrain peft.Method) (*Setup, error) {
	tok := reviews.NewTokenizer()
	s := &Setup{Backend: backend, Config: opts.Config, Batch: opts.Batch, SeqLen: opts.SeqLen}
	var err error
	trainData := reviews.Generate(opts.TrainReviews, opts.Seed)
	if s.Train, err = reviews.Batches(tok, trainData, opts.Batch, opts.SeqLen); err != nil {
		return nil, err
	}
	if s.Eval, err = reviews.Batches(tok, reviews.Generate(opts.EvalReviews, opts.Seed+1000), opts.Batch, opts.SeqLen); err != nil {
		return nil, err
	}
	lmBatches, err := reviews.LMBatches(tok, trainData, opts.Batch, opts.SeqLen)
	if err != nil {
		return nil, err
	}
	ctx := context.New()
	if err := llama.Init(ctx, opts.Config, 0, opts.Seed); err != nil {
		return nil, err
	}
	s.Pretrained = ctx
	if opts.PretrainSteps == 0 {
		return s, nil
	}
	m, err := peft.NewModel(backend, ctx, llama.CausalLM(opts.Config), pretrain, s.exampleShapes()...)
	if err != nil {
		return nil, fmt.Errorf("experiment: pretraining model: %w", err)
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: opts.PretrainSteps, LearningRate: 3e-3, WarmupSteps: opts.PretrainSteps / 10,
		Loss: peft.NextTokenLoss, Progress: opts.Progress, Output: opts.Output,
	})
	if err != nil {
		return nil, err
	}
	if s.PretrainLosses, err = trainer.Train(peft.NewDataset("reviews-lm", lmBatches, true)); err != nil {
		return nil, fmt.Errorf("experiment: pretraining: %w", err)
	}
	return s, nil
}

func (s *Setup) exampleShapes() []shapes.Shape {
	shape := shapes.Make(dtypes.Int32, s.Batch, s.SeqLen)
	return []shapes.Shape{shape, shape}
}

// NewClassifier returns the pretrained model (a fresh copy of its weights, plus a new 2-class
// "score" head) with method applied.
func (s *Setup) NewClassifier(method peft.Method) (*peft.Model, error) {
	ctx := context.New()
	for v := range s.Pretrained.IterVariables() {
		if !strings.HasPrefix(v.Scope(), "/model") {
			continue // optimizer moments, step counters, lm_head
		}
		value, err := v.Value()
		if err != nil {
			return nil, err
		}
		clone, err := value.LocalClone()
		if err != nil {
			return nil, err
		}
		ctx.InAbsPath(v.Scope()).VariableWithValue(v.Name(), clone)
	}
	if err := llama.Init(ctx, s.Config, 2, 7); err != nil {
		return nil, err
	}
	return peft.NewModel(s.Backend, ctx, llama.Classifier(s.Config, 2), method, s.exampleShapes()...)
}

// Result is one method's outcome on the task.
type Result struct {
	Method      string
	Report      peft.ParamReport
	StepsPerSec float64
	// StepTime is the median train-step time (compilation excluded).
	StepTime time.Duration
	// FinalLoss is the held-out loss after training; Accuracy the held-out accuracy.
	FinalLoss, Accuracy float64
	// InitialLoss and InitialAccuracy are measured before training.
	InitialLoss, InitialAccuracy float64
	// Losses is the training loss of each step.
	Losses []float64
	// TrainableBytes counts the trainable parameters plus their optimizer state.
	TrainableBytes int64
	Model          *peft.Model
}

// FineTune trains method on the classification task for steps at learning rate lr and evaluates
// it before and after.
func (s *Setup) FineTune(name string, method peft.Method, steps int, lr float64, progress peft.Progress, out io.Writer) (*Result, error) {
	m, err := s.NewClassifier(method)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: steps, LearningRate: lr, WarmupSteps: steps / 10, Loss: peft.CrossEntropy, Accuracy: true,
		Progress: progress, Output: out,
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	eval := peft.NewDataset("reviews-eval", s.Eval, false)
	before, err := trainer.Evaluate(eval)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	start := time.Now()
	losses, err := trainer.Train(peft.NewDataset("reviews-train", s.Train, true))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	elapsed := time.Since(start)
	after, err := trainer.Evaluate(eval)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	r := &Result{
		Method: name, Report: m.Report(), StepTime: trainer.MedianStepTime(),
		StepsPerSec: float64(steps) / elapsed.Seconds(),
		FinalLoss:   after.Loss, Accuracy: after.Accuracy, InitialLoss: before.Loss, InitialAccuracy: before.Accuracy,
		Losses: losses, Model: m,
	}
	for _, tv := range m.TrainableVariables() {
		r.TrainableBytes += int64(tv.Variable.Shape().Memory())
	}
	r.TrainableBytes += peft.OptimizerStateBytes(m.Context())
	return r, nil
}

// WriteTable prints the results as an aligned table.
func WriteTable(w io.Writer, results []*Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "method\ttrainable\ttrainable %\tsteps/s\tloss before\tloss after\taccuracy before\taccuracy after\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%.3f\t%.1f\t%.4f\t%.4f\t%.3f\t%.3f\t\n", r.Method, peft.Thousands(r.Report.Trainable),
			r.Report.Percent(), r.StepsPerSec, r.InitialLoss, r.FinalLoss, r.InitialAccuracy, r.Accuracy)
	}
	return tw.Flush()
}
