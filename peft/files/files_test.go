//go:build unix

package files_test

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"peft/peft/files"
)

// What Read takes and refuses, each before opening or reading anything it refuses: a FIFO (which
// would block the open), a device, a link out of the folder (directly, absolutely or down a
// chain), a file over the limit.
func TestRead(t *testing.T) {
	outside := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(outside, "secret"), []byte("x"), 0o644))
	for _, tc := range []struct {
		name  string
		setup func(dir string)
		limit int64
		want  string // "" : reads "data"
	}{
		{"regular", func(dir string) { write(t, dir, "f", "data") }, 10, ""},
		{"link in the folder", func(dir string) { write(t, dir, "real", "data"); link(t, "real", dir, "f") }, 10, ""},
		{"chain in the folder", func(dir string) { write(t, dir, "real", "data"); link(t, "real", dir, "mid"); link(t, "mid", dir, "f") }, 10, ""},
		{"over the limit", func(dir string) { write(t, dir, "f", "data") }, 3, "f has 4 bytes, over the limit of 3"},
		{"link out", func(dir string) { link(t, "../x", dir, "f") }, 10, "f is a symbolic link out of the folder (to ../x)"},
		{"absolute link", func(dir string) { link(t, filepath.Join(outside, "secret"), dir, "f") }, 10, "is a symbolic link out of the folder"},
		{"chain that leaves", func(dir string) {
			require.NoError(t, os.Mkdir(filepath.Join(dir, "sub"), 0o755))
			link(t, "../../x", dir, "sub/l")
			link(t, "sub/l", dir, "f")
		}, 10, "f is a symbolic link out of the folder (to ../../x)"},
		{"device", func(dir string) { link(t, "/dev/zero", dir, "f") }, 10, "out of the folder (to /dev/zero)"},
		{"FIFO", func(dir string) { require.NoError(t, syscall.Mkfifo(filepath.Join(dir, "f"), 0o644)) }, 10, "f is not a regular file"},
		{"folder", func(dir string) { require.NoError(t, os.Mkdir(filepath.Join(dir, "f"), 0o755)) }, 10, "f is not a regular file"},
		{"Hugging Face cache", func(dir string) {
			require.NoError(t, os.MkdirAll(filepath.Join(dir, "..", "..", "blobs"), 0o755))
			write(t, filepath.Join(dir, "..", ".."), "blobs/123", "data")
			link(t, "../../blobs/123", dir, "f")
		}, 10, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "snapshots", "abc")
			require.NoError(t, os.MkdirAll(dir, 0o755))
			tc.setup(dir)
			done := make(chan struct{})
			var data []byte
			var err error
			go func() { data, err = files.Read(os.DirFS(dir), "f", tc.limit); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("Read blocked")
			}
			if tc.want == "" {
				require.NoError(t, err)
				require.Equal(t, "data", string(data))
				return
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func write(t *testing.T, dir, name, content string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
}

func link(t *testing.T, target, dir, name string) {
	t.Helper()
	require.NoError(t, os.Symlink(target, filepath.Join(dir, name)))
}
