// SPDX-License-Identifier: GPL-2.0-or-later

// UDP replies through pestod come from the address the client wrote to: connected clients
// (as DNS resolvers, QUIC and WireGuard make them) of several 127.0.0.0/8 addresses, through
// one wildcard rule, each get their answer. In process (InProcessPestod.swift): each client
// runs on a helper thread while the test's thread turns the loop that serves it.

import PestoModel
import PestoSystem
import PestoTestSupport
import Testing

@testable import PestoDBus
@testable import PestoService

#if canImport(Glibc)
    import Glibc
#endif

@Suite("pestod UDP reply addresses (in process)", .timeLimit(.minutes(10)))
struct UDPReplyAddressRelayTests {
    /// Sends `payload` on the connected UDP socket `fd` and waits up to 5 s for an answer;
    /// nil when none comes (the kernel drops a reply from any other address).
    static func exchange(_ fd: Int32, _ payload: [UInt8]) -> [UInt8]? {
        guard send(fd, payload, payload.count, 0) == payload.count else { return nil }
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5000) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 2048)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n >= 0 ? Array(buffer[..<n]) : nil
    }

    @Test(
        "connected clients of 127.0.0.5 and 127.0.0.6 through a 0.0.0.0 rule, and of 127.0.0.7 through a dual-stack rule, get their replies"
    )
    func connectedClients() throws {
        let f = try InProcessPestod()
        let ports = TestSockets.freePorts(3)
        let server = try #require(UDPEchoServer(port: ports.upperBound))
        defer { server.stop() }
        try f.table(
            "Insert",
            [
                .uint32(1),
                .vardict([
                    ("protocol", .string("udp")), ("address", .string("0.0.0.0")), ("first-port", .uint16(ports.lowerBound)),
                    ("target-address", .string("127.0.0.1")), ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        try f.table(
            "Insert",
            [
                .uint32(2),
                .vardict([
                    ("protocol", .string("udp")), ("first-port", .uint16(ports.lowerBound + 1)), ("target-port", .uint16(ports.upperBound)),
                ]),
            ])
        try f.table("Activate", [.uint32(1)])
        try f.table("Activate", [.uint32(2)])
        for (last, port) in [(UInt32(5), ports.lowerBound), (6, ports.lowerBound), (7, ports.lowerBound + 1)] {
            let address = IPAddress.v4(0x7F00_0000 | last)
            let fd = try #require(TestTraffic.udpClient())
            defer { close(fd) }
            let connected = SocketAddress(address, port: port).withSockaddr { connect(fd, $0, $1) }
            try #require(connected == 0)
            let payload = Array("to \(address)".utf8)
            #expect(f.serving { Self.exchange(fd, payload) } == payload, "a connected client of \(address) port \(port) gets its reply")
        }
    }
}
